"""Models for the tracing tests: tiny random models with peaked outputs, and deeper ones.

A random model's next-token distribution is nearly uniform (p ~ 1/vocab), so a
difference of 1e-5 between two tracers could hide real disagreement. Scaling the final
norm's weight (not the tied unembedding, which would also move the embeddings and the
noise scale) makes the distribution peaked, so restorations move p(answer) by far more
than the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

import tracekit
from tracekit.adapters import adapter_for, make_backend
from tracekit.adapters.architectures import _get
from tracekit.models import Model
from tracekit.models.loading import _config_dir, _reload_tokenizer
from tracekit.models.random_models import offline_tokenizer

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
SHARPNESS = 12.0
# Python source that makes importing transformer_lens, nnsight or gguf fail (the GPU machine has none)
BLOCK_OPTIONAL_PACKAGES = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('transformer_lens', 'nnsight', 'gguf'):
            raise ModuleNotFoundError(f'{name} is blocked (the GPU machine has no such package)')
sys.meta_path.insert(0, Block())
"""

_DEEP = {
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=12, n_head=4, n_positions=64)),
    "gptj": (GPTJConfig, GPTJForCausalLM, dict(n_embd=32, n_layer=12, n_head=4, n_positions=64, rotary_dim=4)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=64,
                                                   max_position_embeddings=64, tie_word_embeddings=False)),
}
_cache: dict = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a loaded machine extra OpenMP threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sharpen(hf, adapter) -> None:
    norm = _get(hf, adapter.final_norm)
    with torch.no_grad():
        norm.weight.mul_(SHARPNESS)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(SHARPNESS)


def sharp(spec: str, backend: str = "hf") -> Model:
    """An independent copy of ``tracekit.load_model(spec)`` with peaked outputs (cached per test session)."""
    key = ("sharp", spec, backend)
    if key not in _cache:
        model = tracekit.load_model(spec, backend=backend, device="cpu")
        _sharpen(model.hf, model.adapter)
        _cache[key] = model
    return _cache[key]


def deep(arch: str, backend: str = "hf") -> Model:
    """A 12-layer, 32-wide random model (windows up to 12), sharpened like ``sharp``."""
    key = ("deep", arch, backend)
    if key not in _cache:
        config_cls, model_cls, kwargs = _DEEP[arch]
        config = config_cls(vocab_size=512, **kwargs)
        config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            hf = model_cls(config).eval()
        for param in hf.parameters():
            param.requires_grad_(False)
        adapter = adapter_for(hf)
        _sharpen(hf, adapter)
        tokenizer, config_dir = offline_tokenizer(), None
        if backend == "transformer_lens":
            config_dir = _config_dir(hf, tokenizer)
            tokenizer = _reload_tokenizer(config_dir)
        wrapped = make_backend(backend, hf, adapter, tokenizer, config_dir)
        _cache[key] = Model(spec=f"test:deep-{arch}", backend=wrapped, tokenizer=tokenizer, adapter=adapter)
    return _cache[key]
