"""Every config group composes; schemas reject unknown keys and bad values at composition."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from shrink.errors import ShrinkError
from shrink.run.validation import check_known_keys

from ..conftest import CONF, make_cfg

GROUPS = ["model", "method", "schedule", "calib", "eval", "logger", "heal", "sparsity", "quant"]
# options that read another group's settings (the GLUE task of eval=glue-hub)
COMPANIONS = {
    ("model", "bert-glue"): ["eval=glue-hub"],
    ("calib", "glue-train"): ["eval=glue-hub"],
    ("model", "local"): ["model.path=/data/my-model"],
    ("model", "gguf"): ["model.path=/data/my-model.Q8_0.gguf"],
}
# options named after what they load
NAMED_BY_PATH = {("model", "local"): "my-model", ("model", "gguf"): "my-model.Q8_0"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = make_cfg(f"{group}={option}", *COMPANIONS.get((group, option), []))
    assert cfg[group].name == NAMED_BY_PATH.get((group, option), option)
    OmegaConf.to_container(cfg, resolve=True)


def test_experiment_composes():
    cfg = make_cfg("+experiment=smoke")
    assert cfg.calib.nsamples == 4 and cfg.logger.name == "jsonl"


def test_defaults():
    cfg = make_cfg()
    assert (cfg.model.name, cfg.method.name, cfg.schedule.name, cfg.budget) == (
        "smollm2-135m",
        "id",
        "greedy-residual",  # id's own default (conf/method/id.yaml); other methods default to uniform
        0.5,
    )
    assert make_cfg("method=svdllm").schedule.name == "uniform"
    assert make_cfg("schedule=uniform").schedule.name == "uniform"  # the command line wins
    assert cfg.logger.mode.value == "offline"
    assert (cfg.quant.name, cfg.sparsity.name, cfg.heal.name) == (
        "none",
        "none",
        "none",
    )  # no step unless asked
    # 16k tokens of two domains, the planning pass on the first half, id's ridge cross-validated
    calib = cfg.calib
    assert (calib.corpus, calib.nsamples, calib.seq_len, calib.profile_share) == (
        "wiki+c4-sample",
        32,
        512,
        0.5,
    )
    assert cfg.method.ridge_cv == 2 and calib.autocast.value == "none"
    previous = make_cfg("calib=wiki", "method.ridge_cv=0").calib  # the previous defaults
    assert (previous.corpus, previous.nsamples, previous.profile_share) == ("wiki", 16, 1.0)


@pytest.mark.parametrize(
    "override",
    [
        "method.rank=3",
        "calib.samples=3",
        "model.weights=x",
        "unknown_key=1",
        "quant.scheme=x",
        "heal.epochs=2",
    ],
)
def test_unknown_keys_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)):
        make_cfg(override)


@pytest.mark.parametrize("override", ["+method.rank=3", "+calib.samples=3", "+unknown_key=1"])
def test_forced_unknown_keys_fail_at_validation(override):
    """Hydra's `+key=` forces a key past the schema; validation still names and rejects it."""
    with pytest.raises(ShrinkError, match=override[1:].split("=")[0].replace(".", r"\.")):
        check_known_keys(make_cfg(override))


def test_model_tiny_kwargs_are_free_form():
    check_known_keys(make_cfg("model=tiny-llama", "+model.tiny.rope_theta=10.0"))


@pytest.mark.parametrize(
    "override", ["budget_unit=flops", "device=tpu", "propagate=sometimes", "budget=half", "dtype=int8"]
)
def test_bad_values_fail(override):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        make_cfg(override)
    assert override.split("=")[1] in str(err.value) or override.split("=")[1] in str(err.value.__cause__)


def test_unknown_group_option_names_choices():
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("method=nope")
    assert "nope" in str(err.value) and "svd" in str(err.value)
