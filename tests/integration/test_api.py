"""The Python API composes the CLI's config and runs the CLI's pipeline: the same settings give the
same numbers and the same checkpoint, whether the model is named, a folder, or already loaded."""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.models import load_model
from shrink.run.pipeline import run_job

from ..conftest import FAST, FAST_PPL, logits, make_cfg

SETTINGS = [*FAST, *FAST_PPL, "schedule=uniform"]
NO_EVAL = [*FAST, "schedule=uniform", "eval=none"]


def _ppl(metrics: dict, which: str = "compressed") -> float:
    return metrics["eval"]["ppl"]["wiki"][which]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """What `python launch.py model=tiny-llama method=id budget=0.5 …` computes."""
    folder = tmp_path_factory.mktemp("cli")
    cfg = make_cfg("model=tiny-llama", "method=id", "budget=0.5", *SETTINGS)
    return run_job(cfg, folder), folder


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def test_a_named_model_gives_the_cli_numbers_and_checkpoint(cli_run, tmp_path):
    finished, folder = cli_run
    result = shrink.compress("tiny-llama", method="id", budget=0.5, overrides=SETTINGS)
    assert _ppl(result.metrics) == _ppl(finished.metrics)
    assert result.metrics["budget_achieved"] == finished.metrics["budget_achieved"] <= 0.5
    ours, theirs = _tensors(result.folder), _tensors(folder)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    saved = result.save(tmp_path / "saved")
    assert (saved / "metrics.json").is_file() and (saved / "model" / "manifest.json").is_file()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(shrink.load(saved / "model"), ids), logits(result.model, ids))
    with pytest.raises(shrink.ShrinkError, match="exists already"):
        result.save(saved)


def test_a_loaded_model_is_compressed_in_place_with_the_cli_numbers(cli_run):
    finished, _ = cli_run
    loaded = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    dense_params = sum(p.numel() for p in loaded.model.parameters())
    result = shrink.compress(loaded.model, tokenizer=loaded.tokenizer, budget=0.5, overrides=SETTINGS)
    assert result.model is loaded.model  # edited in place
    assert sum(p.numel() for p in result.model.parameters()) < dense_params
    assert _ppl(result.metrics, "dense") == _ppl(finished.metrics, "dense")
    assert _ppl(result.metrics) == _ppl(finished.metrics)
    assert result.metrics["model"] == "model" and result.metrics["eval"].get("dense_cached") is None


def test_evaluate_scores_a_loaded_model_as_a_run_scores_it(cli_run):
    finished, _ = cli_run
    loaded = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    scores = shrink.evaluate(loaded.model, loaded.tokenizer, suite="ppl", overrides=SETTINGS)
    assert scores["ppl"]["wiki"]["score"] == _ppl(finished.metrics, "dense")
    assert shrink.evaluate("tiny-llama", suite="ppl", overrides=SETTINGS) == scores


def test_evaluate_scores_a_saved_run_as_the_run_scored_it(cli_run):
    finished, folder = cli_run
    scores = shrink.evaluate(folder, suite="ppl", overrides=SETTINGS)
    assert scores["ppl"]["wiki"]["score"] == pytest.approx(_ppl(finished.metrics), rel=1e-6)
    assert shrink.evaluate(folder / "model", suite="ppl", overrides=SETTINGS) == scores


def test_calibration_texts_calibrate_and_are_recorded():
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20 for i in range(8)]
    result = shrink.compress(
        "tiny-llama", budget=0.6, calibration=texts, overrides=[*FAST, "schedule=uniform", "eval=none"]
    )
    assert result.metrics["calib"]["corpus"].startswith("given-")
    assert result.metrics["budget_achieved"] <= 0.6
    again = shrink.compress(
        "tiny-llama", budget=0.6, calibration="wiki", overrides=[*FAST, "schedule=uniform", "eval=none"]
    )
    ours, theirs = _tensors(result.folder), _tensors(again.folder)
    assert any(not ours[k].equal(theirs[k]) for k in ours)  # other text, other fold


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: shrink.compress(m), "needs its tokenizer"),
        (lambda m: shrink.compress("no-such-model"), "neither a model config"),
        (lambda m: shrink.compress("tiny-llama", method="nope"), "method"),
        (lambda m: shrink.compress("tiny-llama", calibration=[]), "non-empty list of texts"),
        (lambda m: shrink.compress("tiny-llama", budget=2.0, overrides=["logger=none"]), "outside"),
    ],
)
def test_bad_calls_fail_with_one_clear_error(call, message):
    loaded = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    with pytest.raises(Exception, match=message):
        call(loaded.model)
