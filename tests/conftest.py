"""Shared fixtures: tiny random models per architecture and backend, the bundled model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import tracekit  # noqa: E402

TINY_SPECS = ("random:gpt2-tiny", "random:gptj-tiny", "random:llama-tiny")
BACKENDS = ("hf", "transformer_lens", "nnsight")

_cache: dict = {}


def tiny(spec: str, backend: str = "hf"):
    """A shared, read-only tiny model. Tests that change weights must undo their changes."""
    key = (spec, backend)
    if key not in _cache:
        _cache[key] = tracekit.load_model(spec, backend=backend, device="cpu")
    return _cache[key]


@pytest.fixture(params=TINY_SPECS)
def tiny_model(request):
    return tiny(request.param)


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M (hf backend), loaded once per test session."""
    return tracekit.load_model("smollm2-135m", backend="hf", device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_shared_data(tmp_path, monkeypatch):
    """A machine without the data folder: $TRACEKIT_DATA empty, and no ../shared/data next to the
    checkout or the working directory (CI's clone may sit beside one)."""
    from tracekit.data import locate

    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path / "no-data"))
    monkeypatch.setattr(locate, "repo_root", lambda: tmp_path / "checkout")
    (tmp_path / "cwd").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "cwd")
