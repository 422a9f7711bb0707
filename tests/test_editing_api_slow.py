"""Editing the bundled SmolLM2 through ``tracekit.edit`` with its presets (slow)."""

import pytest

import tracekit
from tracekit.data import FactRecord
from tracekit.editing.presets import ft_preset
from tracekit.editing.metrics import MetricsConfig

DARRIEUX = FactRecord(
    case_id=0, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_true=" French",
    target_new=" English",
    paraphrase_prompts=("Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"),
    neighborhood_prompts=("Michel Rocard is a native speaker of", "Jacques Chaban-Delmas is a native speaker of",
                          "The native language of Raymond Barre is"))


@pytest.mark.slow
def test_ft1_rewrites_darrieux_at_the_preset_layer(smollm):
    preset = ft_preset(smollm, "error-injection", 1)
    result = tracekit.edit(smollm, DARRIEUX, method="ft-1", problem="error-injection", metrics=MetricsConfig(essence=False))
    assert result.layer == preset.layer and result.hparams == preset
    assert result.scores.scores["rewrite"] >= 0.9
    assert result.scores.scores["efficacy_success"] == 1.0


@pytest.mark.slow
def test_ft5_rewrites_darrieux(smollm):
    result = tracekit.edit(smollm, DARRIEUX, method="ft-5", metrics=MetricsConfig(essence=False))
    assert len(result.layers) == 5 and result.scores.scores["rewrite"] >= 0.9
