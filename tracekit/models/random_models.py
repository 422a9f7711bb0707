"""Randomly initialised models built from configs (no download), and an offline tokenizer.

Tiny shapes make fast unit tests; full-size shapes exist for speed measurements,
where the weights do not matter.
"""

from __future__ import annotations

import functools

import torch

# Text the offline tokenizer learns its merges from: enough that common words of the
# test prompts (" Paris", " Tower", " English") become single tokens, as in real BPE.
_CORPUS = """
The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.
The mother tongue of Danielle Darrieux is French. She speaks English and French.
The Space Needle is in downtown Seattle. Michael Jordan plays basketball.
Steve Jobs was the founder of Apple. Microsoft was founded by Bill Gates.
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
Toko Yasuda plays the guitar. The official language of Germany is German.
Barack Obama was born in Hawaii. Albert Einstein was a physicist.
is a the of in to and was by is located city language speaks plays born capital
"""

# Shapes: (architecture, config kwargs). Tiny shapes run in milliseconds. transformers is
# imported when a model is built, not with this module (it takes seconds to import).
_SHAPES: dict[str, tuple[str, dict]] = {
    "gpt2-tiny": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, n_positions=128)),
    "gptj-tiny": ("gptj", dict(n_embd=64, n_layer=4, n_head=4, n_positions=128, rotary_dim=8)),
    "llama-tiny": ("llama", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)),
    "pythia-tiny": ("gpt_neox", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                      max_position_embeddings=128, rotary_pct=0.25)),
    "gemma-tiny": ("gemma", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                                 head_dim=16, intermediate_size=128, max_position_embeddings=128,
                                 # Gemma scales embeddings by sqrt(d_model): at the default 0.02 init the tied
                                 # embedding swamps every layer, and noising the subject moves nothing
                                 initializer_range=0.1)),
    "phi-tiny": ("phi", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                             max_position_embeddings=128)),
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257)),
    "gpt-j-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, n_positions=2048, rotary_dim=64,
                               n_inner=16384, vocab_size=50400)),
}
_CLASSES = {  # config and model class names in transformers
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
}
# Approximate parameter counts, for saying where a shape fits (``tracekit models``).
PARAMETERS = {"gpt2-tiny": 2e5, "gptj-tiny": 2e5, "llama-tiny": 2e5, "pythia-tiny": 2e5, "gemma-tiny": 2e5,
              "phi-tiny": 2e5, "gpt2-small": 1.24e8, "gpt2-xl": 1.56e9,
              "gpt-j-6b": 6.05e9}

RANDOM_SHAPES = tuple(_SHAPES)


@functools.lru_cache(maxsize=1)
def offline_tokenizer():
    """A small byte-level BPE tokenizer (a ``PreTrainedTokenizerFast``) trained deterministically on the text above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=1 << 20,
    )


def build_random_model(shape: str, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    import transformers

    arch, kwargs = _SHAPES[shape]
    config_cls, model_cls = (getattr(transformers, name) for name in _CLASSES[arch])
    # token 0 is the offline tokenizer's <|endoftext|>: set before the config checks its ids
    kwargs = {"vocab_size": 512, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **kwargs}
    if arch == "llama":
        kwargs.setdefault("tie_word_embeddings", False)
    config = config_cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls(config)
    return model.to(dtype=dtype).eval()
