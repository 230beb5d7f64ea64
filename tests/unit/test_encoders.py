"""`eval=glue`: encoder scores from embeddings (offline), on a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest

from shrink.errors import ShrinkError
from shrink.evaluation import encoders
from shrink.run.pipeline import run

from ..conftest import FAST, make_cfg

GLUE_FAST = ["eval=glue", "eval.glue.sentences=24", "eval.glue.batch_size=64", "eval.glue.max_len=48"]


def test_glue_suite_scores_dense_and_compressed(run_job):
    metrics, folder = run_job("model=tiny-bert", *FAST, *GLUE_FAST, "method=id", "budget=0.5")
    glue = metrics["eval"]["glue"]
    assert set(glue) == {"cosine", "mrpc", "sst2"}
    for task in ("mrpc", "sst2"):
        assert 0.0 <= glue[task]["dense"] <= 1.0 and 0.0 <= glue[task]["compressed"] <= 1.0
    assert glue["mrpc"]["n"] == 408 and glue["sst2"]["n"] == 872
    # random tiny encoders give nearly parallel embeddings to every sentence, so only "moved" is checked
    assert glue["cosine"]["n"] == 24 and -1.0 <= glue["cosine"]["p5"] <= glue["cosine"]["value"] < 1.0 - 1e-7
    assert "_state" not in metrics["eval"]

    again, _ = run_job("model=tiny-bert", *FAST, *GLUE_FAST, "method=svd", "budget=1.0", name="again")
    assert "glue" in again["eval"]["dense_cached"]
    assert again["eval"]["glue"]["cosine"]["value"] == pytest.approx(1.0, abs=1e-5)  # budget 1 = dense


def test_embedding_similarity_of_identical_embeddings_is_one():
    e = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))[0]
    assert encoders.embedding_similarity(e, e)["value"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["model=tiny-bert", "eval=glue", "eval.glue.tasks=[cola]"], ["cola", "cosine, mrpc, sst2"]),
        (["model=tiny-llama", "eval=glue"], ["causal LM", "eval=ppl"]),
    ],
)
def test_bad_glue_settings_fail_before_loading(tmp_path, overrides, words):
    with pytest.raises(ShrinkError) as err:
        run(make_cfg(*overrides, *FAST), run_dir=tmp_path / "run")
    assert all(w in str(err.value) for w in words)
    assert not (tmp_path / "run").exists()
