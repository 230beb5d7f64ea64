"""`python -m shrink export`: checkpoints written before config.json and model cards gain them;
folders that are not readable shrink checkpoints fail with one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import shrink
from shrink.checkpoints.export import main

from ..conftest import FAST, FAST_PPL, logits

UNIFORM = ["model=tiny-llama", "method=id", "schedule=uniform", "budget=0.7", "method.attention=heads"]


def _as_before_issue_16(model_folder):
    """What a checkpoint looked like before: no config.json, no card, no widths in the manifest."""
    for name in ("config.json", "generation_config.json", "README.md"):
        (model_folder / name).unlink(missing_ok=True)
    manifest = json.loads((model_folder / "manifest.json").read_text())
    manifest["info"].pop("blocks", None)
    (model_folder / "manifest.json").write_text(json.dumps(manifest))


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_an_older_run_exports_in_place(run_job, capsys):
    metrics, run = run_job(*UNIFORM, *FAST, *FAST_PPL)
    _as_before_issue_16(run / "model")
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "config.json: transformers loads" in out and "README.md" in out
    stock = AutoModelForCausalLM.from_pretrained(run / "model")
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(stock, ids), logits(shrink.load(run / "model"), ids))
    card = (run / "model" / "README.md").read_text()
    assert f"{metrics['eval']['ppl']['wiki']['compressed']:.2f}" in card and "| 1 | " in card


def test_export_to_another_folder_leaves_the_source_as_it_was(run_job, tmp_path):
    _, run = run_job("model=tiny-llama", "method=svd", "budget=0.7", *FAST, "eval=none")
    _as_before_issue_16(run / "model")
    before = _files(run / "model")
    assert main([str(run / "model"), "--out", str(tmp_path / "exported")]) == 0
    assert _files(run / "model") == before
    exported = tmp_path / "exported"
    assert json.loads((exported / "config.json").read_text())["auto_map"]  # factor pairs: remote code
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    assert (exported / "README.md").is_file()
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(remote, ids), logits(shrink.load(run / "model"), ids))


def _truncate(model_folder):
    weights = model_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return r"model\.safetensors: not a readable safetensors file"


def _mismatch(model_folder):
    manifest = json.loads((model_folder / "manifest.json").read_text())
    edit = next(e for e in manifest["edits"] if e["kind"] == "linear")
    edit["in"] += 8
    (model_folder / "manifest.json").write_text(json.dumps(manifest))
    return r"the weights do not match manifest\.json \(size mismatch for model\.layers\.\d\.\S+: "


def _not_json(model_folder):
    (model_folder / "manifest.json").write_text("{ not json")
    return r"manifest\.json: not a JSON manifest"


def _hf_only(model_folder):
    (model_folder / "manifest.json").unlink()
    (model_folder / "config.json").write_text("{}")
    return r"is a Hugging Face folder, not a shrink checkpoint"


def _empty(model_folder):
    for file in model_folder.iterdir():
        file.unlink()
    return r"is neither a run folder nor a shrink checkpoint"


@pytest.mark.parametrize(
    "spoil", [_truncate, _mismatch, _not_json, _hf_only, _empty], ids=lambda f: f.__name__[1:]
)
def test_a_folder_that_is_not_a_readable_checkpoint_fails_with_one_line(run_job, tmp_path, capsys, spoil):
    _, run = run_job(*UNIFORM, *FAST, "eval=none")
    match = spoil(run / "model")
    before = _files(run / "model")
    capsys.readouterr()  # the run's own output
    assert main([str(run / "model"), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "exported").exists() and not (tmp_path / "exported.partial").exists()
    assert _files(run / "model") == before


def test_push_to_hub_without_a_hub_fails_before_loading(tmp_path, monkeypatch):
    from ..conftest import fails

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(
        tmp_path, "model=tiny-llama", *FAST, "eval=none", "push_to_hub=someone/tiny",
        match=r"push_to_hub=someone/tiny needs a model hub, and none answers",
    )  # fmt: skip


def test_push_to_hub_uploads_the_model_folder(run_job, monkeypatch):
    from shrink.data import hub

    pushed = []
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(hub, "push", lambda folder, repo: pushed.append((folder, repo)) or "url")
    _, run = run_job(*UNIFORM, *FAST, "eval=none", "push_to_hub=someone/tiny")
    assert pushed == [(run / "model", "someone/tiny")]
