"""Model sources other than packaged and tiny: a local safetensors folder."""

from __future__ import annotations

import torch

from shrink.models import load_model

from .conftest import FAST, FAST_PPL, make_cfg


def test_local_safetensors_folder(run_job, tmp_path):
    tiny = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    folder = tmp_path / "local-model"
    tiny.model.save_pretrained(folder, safe_serialization=True)
    tiny.tokenizer.save_pretrained(folder)
    assert any(folder.glob("*.safetensors"))
    metrics, _ = run_job(
        "model=tiny-llama", "model.source=local", f"model.path={folder}", *FAST, *FAST_PPL, "save_model=false"
    )
    assert metrics["budget_achieved"] <= 0.5 and metrics["params_dense"] == sum(
        p.numel() for p in tiny.model.parameters()
    )
