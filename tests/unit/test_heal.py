"""Recovery after compression (`heal=lora|kd`): LoRA through the layouts of shrink's layers and
merged exactly, zero weights kept, the loss, the windows kept off test text, the order with the
steps, resume mid-heal, and bad settings failing before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import shrink
from shrink.heal.adapters import merge_lora, with_lora
from shrink.heal.losses.distill import kl_loss, top_kl_loss
from shrink.heal.recover import heal
from shrink.heal.targets import target_linears
from shrink.heal.teacher_cache import top_targets
from shrink.heal.windows import heal_windows
from shrink.models import build_adapter
from shrink.models.edits import HeadPaddedLinear, HeadSlicedLinear, LowRankLinear

from ..conftest import FAST, FAST_PPL, compress_in_memory, fails, logits, make_cfg, tiny_overrides

THIN = ["method=id", "budget=0.5", "method.attention=dims"]
HEAL = ["heal.tokens=512", "heal.seq_len=32", "heal.batch=2"]
LORA = ["heal.params=lora", "heal.rank=4"]


def _heal_cfg(*overrides: str):
    return make_cfg(*overrides).heal


def _thin(*extra: str):
    """A tiny Llama with thinned values (padded v, sliced o) and thinned queries and keys."""
    return compress_in_memory(*tiny_overrides("tiny-llama"), *THIN, *extra)


def _kinds(model) -> set[type]:
    return {type(m) for m in model.modules()}


def _randomise_lora(wrapped, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(
    "method",
    [
        THIN,
        ["method=id", "budget=0.6", "method.qk_dims=true"],
        ["method=svd", "budget=0.6"],
        ["method=slicegpt", "budget=0.8"],
    ],
    ids=["id-values", "id-qk", "svd", "slicegpt"],
)
def test_merged_lora_computes_what_the_adapters_did(method):
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *method)
    model, adapter = done.model, build_adapter(done.model)
    kinds = _kinds(model)
    if method[1:] == ["budget=0.5", "method.attention=dims"]:  # thin values: padded v, sliced o
        assert {HeadPaddedLinear, HeadSlicedLinear} <= kinds
    if "method.qk_dims=true" in method:  # thin queries and keys at their kept places
        assert any(isinstance(m, HeadPaddedLinear) and m.positions is not None for m in model.modules())
    if method[0] == "method=svd":
        assert LowRankLinear in kinds
    ids = torch.randint(0, 255, (2, 24))
    before = logits(model, ids)
    count = sum(p.numel() for p in model.parameters())
    linears = target_linears(adapter, ["all"])
    wrapped = with_lora(model, linears, rank=4, alpha=8.0, dropout=0.0)
    assert torch.allclose(logits(wrapped, ids), before, atol=1e-6)  # B starts at zero
    _randomise_lora(wrapped)
    adapted = logits(wrapped, ids)
    assert not torch.allclose(adapted, before, atol=1e-3)
    merged = merge_lora(wrapped, linears)
    assert merged is model and _kinds(merged) == kinds
    assert sum(p.numel() for p in merged.parameters()) == count
    assert (logits(merged, ids) - adapted).abs().max() < 1e-5 * adapted.abs().max().clamp_min(1)


def test_a_factor_pair_gets_an_adapter_on_each_factor():
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=svd", "budget=0.6")
    names = target_linears(build_adapter(done.model), ["down_proj"])
    assert names and all(n.endswith(("down_proj.first", "down_proj.second")) for n in names)


@pytest.mark.parametrize("params", ["lora", "full"])
def test_weights_that_are_zero_stay_zero(tmp_path, params):
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=id", "budget=0.8", "sparsity=wanda")
    adapter = build_adapter(done.model)
    zeros = {n: (lin.weight == 0).clone() for n, lin in target_linears(adapter, ["all"]).items()}
    assert all(z.float().mean() >= 0.45 for z in zeros.values())
    cfg = _heal_cfg("heal=kd", *HEAL, *(LORA if params == "lora" else ["heal.params=full"]), "heal.lr=0.01")
    before = {n: lin.weight.detach().clone() for n, lin in target_linears(adapter, ["all"]).items()}
    summary = heal(
        adapter, done.loaded.tokenizer, _teacher, cfg, False, torch.device("cpu"), tmp_path / "ckpt",
        tmp_path / "heal.jsonl",
    )  # fmt: skip
    assert summary["steps"] == 8
    after = target_linears(adapter, ["all"])
    assert any(not torch.equal(after[n].weight, before[n]) for n in before)  # it trained
    for name, zero in zeros.items():
        assert (after[name].weight[zero] == 0).all(), name


def _teacher():
    from shrink.models import load_model

    return load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0).model


def test_zero_tokens_leave_the_model_as_it_is(tmp_path):
    done = _thin()
    ids = torch.randint(0, 255, (2, 24))
    before = logits(done.model, ids)
    cfg = _heal_cfg("heal=lora", "heal.tokens=0")
    adapter = build_adapter(done.model)
    summary = heal(
        adapter, done.loaded.tokenizer, None, cfg, False, torch.device("cpu"), tmp_path, tmp_path / "h"
    )
    assert summary["steps"] == 0
    assert torch.equal(logits(done.model, ids), before)


def test_the_distillation_loss_is_the_tempered_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    for temperature in (1.0, 2.0):
        p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
        explicit = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
        assert kl_loss(s, t, temperature).item() == pytest.approx(explicit.item(), rel=1e-5)
    assert kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def _coarse_kl(s, t, index, temperature):
    """The KL of the distributions summed into the bins index[…, 0], …, index[…, k-1] and the rest."""
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    p_top, q_top = p.gather(-1, index), q.gather(-1, index)
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    kl = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_cached_kl_is_the_kl_of_the_coarsened_distributions(temperature):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen) * 3
    full = kl_loss(s, t, temperature)
    for top in (1, 4, 9):
        cached = top_targets(t, temperature, top)
        index = cached["teacher_index"].long()
        assert torch.equal(index, (t / temperature).topk(top, -1).indices)
        loss = top_kl_loss(s, *cached.values(), temperature)
        assert loss.item() == pytest.approx(_coarse_kl(s, t, index, temperature).item(), rel=1e-4)
        assert 0 < loss.item() < full.item()  # coarser bins: a lower bound of the full KL
    # one token left out, or none: the full KL, and its gradient
    for top in (10,):
        cached = top_targets(t, temperature, top)
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        exact, ours = kl_loss(a, t, temperature), top_kl_loss(b, *cached.values(), temperature)
        assert ours.item() == pytest.approx(exact.item(), rel=1e-5)
        exact.backward()
        ours.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert top_kl_loss(t, *top_targets(t, 1.0, 3).values()).item() == pytest.approx(0.0, abs=1e-6)


def test_heal_windows_are_cut_from_the_calibration_part_only(monkeypatch):
    from shrink.data import corpora

    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=id", "budget=0.9")
    tokenizer = done.loaded.tokenizer
    asked = []
    real = corpora.token_stream

    def recorded(name, which, tok):
        asked.append((name, which))
        return real(name, which, tok)

    monkeypatch.setattr(corpora, "token_stream", recorded)
    windows = heal_windows("wiki+c4-sample", tokenizer, 4096, 64, seed=0)
    assert {which for _, which in asked} == {"calib"}
    stream = real("wiki+c4-sample", "calib", tokenizer)
    starts = set(range(0, stream.numel() - 63, 64))
    for window in windows:  # every window is one of the calibration part's aligned windows
        first = int(torch.nonzero((stream.unfold(0, 64, 64) == window).all(-1))[0]) * 64
        assert first in starts
    assert windows.shape == (64, 64) and len({tuple(w.tolist()) for w in windows}) == 64


def test_a_healed_run_keeps_its_structure_reports_both_scores_and_reloads(run_job, saved_logits):
    plain, plain_folder = run_job("model=tiny-llama", *FAST, *FAST_PPL, "budget=0.6", name="plain")
    metrics, folder = run_job(
        "model=tiny-llama", *FAST, *FAST_PPL, "budget=0.6", "heal=kd", *HEAL, "heal.lr=0.01"
    )
    for key in ("params_compressed", "block_params_compressed", "block_macs_compressed", "budget_achieved"):
        assert metrics[key] == plain[key], key
    ppl = metrics["eval"]["ppl"]["wiki"]
    assert ppl["before_heal"] == pytest.approx(plain["eval"]["ppl"]["wiki"]["compressed"], rel=1e-6)
    assert ppl["compressed"] != ppl["before_heal"]
    assert metrics["heal"]["steps"] == 8 and metrics["heal"]["tokens"] == 512
    rows = [json.loads(line) for line in (folder / "heal.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["tokens"] == 512
    assert not (folder / "progress").exists()  # the heal's checkpoints went with the finished run
    manifest = json.loads((folder / "model" / "manifest.json").read_text())
    assert manifest == json.loads((plain_folder / "model" / "manifest.json").read_text())
    ours, theirs = (
        load_file(folder / "model" / "model.safetensors"),
        load_file(plain_folder / "model" / "model.safetensors"),
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    reloaded = shrink.load(folder / "model")
    assert torch.allclose(logits(reloaded, saved_logits["ids"]), saved_logits["logits"], atol=1e-5)


def test_steps_run_after_heal_on_the_healed_weights(run_job):
    metrics, folder = run_job(
        "model=tiny-llama", *FAST, *FAST_PPL, "budget=0.8", "heal=lora", *HEAL, *LORA, "sparsity=wanda",
        "sparsity.pattern=2:4",
    )  # fmt: skip
    assert metrics["block_zero_fraction"] == pytest.approx(0.5)
    assert (folder / "steps.jsonl").read_text().count("\n") == 14  # 7 linears × 2 blocks
    assert "before_heal" in metrics["eval"]["ppl"]["wiki"]


@pytest.mark.parametrize(
    "params",
    [[*LORA, "heal.dropout=0.1"], ["heal.params=full"], ["heal.cache_teacher=true", "heal.cache_top=16"]],
    ids=["lora", "full", "cached-teacher"],
)
def test_resume_mid_heal_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, params):
    from shrink.heal import trainer
    from shrink.run.pipeline import run

    overrides = ["model=tiny-llama", *FAST, "eval=none", "budget=0.6", "heal=kd", *HEAL, "heal.save_every=3",
                 "heal.lr=0.01", *params]  # fmt: skip
    run(make_cfg(*overrides), run_dir=tmp_path / "whole")
    real = trainer.StepLog.on_log

    def die_after_five(self, args, state, control, logs=None, **kwargs):
        real(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.StepLog, "on_log", die_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*overrides), run_dir=tmp_path / "cut")
    assert (tmp_path / "cut" / "progress" / "heal" / "checkpoint-3").is_dir()
    monkeypatch.setattr(trainer.StepLog, "on_log", real)
    run(make_cfg(*overrides, "resume=true"), run_dir=tmp_path / "cut")
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["heal"]["resumed_at_step"] == 3
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "heal.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_cached_teacher_targets_are_built_once_and_heal_like_the_teacher(run_job, monkeypatch):
    import shrink.models

    base = ["model=tiny-llama", *FAST, "eval=none", "budget=0.6", "heal=kd", *HEAL, "heal.lr=0.01"]
    live, live_folder = run_job(*base, name="live")
    # 259 of the 260 tokens kept: the cached KL is the full one, so the heal is the same
    cache = ["heal.cache_teacher=true", "heal.cache_top=259"]
    built, built_folder = run_job(*base, *cache, name="built")
    assert built["heal"]["teacher_cache"] == "built" and "teacher_cache" not in live["heal"]
    ours, theirs = (load_file(f / "model" / "model.safetensors") for f in (built_folder, live_folder))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-4) for k in ours)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the dense model was loaded although its targets are cached")

    monkeypatch.setattr(shrink.models, "load_model", no_teacher)  # the teacher's loader reads it
    hit, hit_folder = run_job(*base, *cache, name="hit")
    assert hit["heal"]["teacher_cache"] == "hit"
    again = load_file(hit_folder / "model" / "model.safetensors")
    assert all(torch.equal(again[k], ours[k]) for k in ours)  # the same targets: the same weights
    with pytest.raises(AssertionError, match="the dense model was loaded"):  # another entry: built
        run_job(*base, "heal.cache_teacher=true", "heal.cache_top=8", name="top8")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["heal=lora", "heal.lr=0"], r"heal.lr=0.0 must be > 0"),
        (
            ["heal=kd", "heal.cache_teacher=true", "heal.hidden=0.5"],
            r"heal.cache_teacher=true caches the teacher's logits, not its hidden states",
        ),
        (["heal=kd", "heal.cache_teacher=true", "heal.cache_top=0"], r"heal.cache_top=0 must be ≥ 1"),
        (
            ["heal=kd", "heal.cache_teacher=true", "heal.cache_top=260"],
            r"heal.cache_top=260 must be in \[1, 259\]: the model has 260 tokens",
        ),
        (["heal=lora", "heal.rank=64"], r"heal.rank=64 is wider than k_proj \(32 on its smaller side"),
        (["heal=lora", "heal.targets=[q_proj,attn]"], r"attn is no block linear of this model; valid: all, "),
        (["heal=kd", "stream=true"], r"heal trains the whole compressed model in memory, which stream=true"),
        (["heal.tokens=100"], r"heal.tokens=100: heal=none trains nothing"),
        (
            ["heal=lora", "heal.schedule=wavy"],
            r"heal.schedule=wavy is no learning-rate schedule; valid: linear",
        ),
        (["heal=kd", "heal.temperature=0"], r"heal.temperature=0.0 must be > 0"),
        (["heal=lora", "heal.corpus=novels"], r"unknown corpus 'novels'"),
        (["heal=lora", "heal.params=full", "heal.rank=4"], r"heal.params=full trains the weights themselves"),
        (["heal=lora", "quant=gptq", "quant.target=dense"], r"quant.target=dense \(GPTAQ\) fits each block"),
    ],
)
def test_bad_heal_settings_fail_before_loading(tmp_path, overrides, match):
    fails(tmp_path, *tiny_overrides("tiny-llama"), *overrides, match=match)


def test_a_saved_run_is_healed_by_the_heal_command(run_job, capsys):
    from shrink.__main__ import main

    _, folder = run_job("model=tiny-llama", *FAST, "eval=none", "budget=0.6")
    before = shrink.load(folder / "model")
    assert main(["heal", str(folder), "heal=kd", *HEAL, "heal.lr=0.01"]) == 0
    assert "healed: heal=kd 512 tokens" in capsys.readouterr().out
    healed = shrink.load(folder / "healed" / "model")
    ids = torch.randint(0, 255, (2, 24))
    assert not torch.allclose(logits(healed, ids), logits(before, ids))
    assert sum(p.numel() for p in healed.parameters()) == sum(p.numel() for p in before.parameters())
    assert json.loads((folder / "healed" / "heal.json").read_text())["steps"] == 8
    assert not (folder / "healed" / "progress").exists()
    assert main(["heal", str(folder), "heal=none"]) == 2
    alone = shutil.copytree(folder / "model", folder.parent / "alone")  # no run folder: no teacher
    assert main(["heal", str(alone), "heal=kd", *HEAL]) == 2
    assert main(["heal", str(folder), "heal=lora", "budget=0.3"]) == 2
    err = capsys.readouterr().err
    assert "heal=none trains nothing" in err and "only a run folder names" in err
    assert "budget=0.3: only heal, heal.*, device, seed and the teacher's model.device_map" in err


def test_the_heal_command_distils_from_a_teacher_spread_over_cpu_and_disk(run_job, tmp_path, capsys):
    """A run's dense model placed by model.device_map (here block 1, the final norm and the tied
    head offloaded to disk) teaches the student trained whole: the same healed weights as with the
    teacher in memory. A run that heals refuses the map with the command to use instead."""
    from shrink.__main__ import main
    from shrink.models import load_model
    from shrink.models.device_map import is_mapped

    from ..conftest import local_model, sharded_copy

    overrides = [*local_model("tiny-llama", sharded_copy(tmp_path, "tiny-llama")), *FAST]
    _, folder = run_job(*overrides, "eval=none", "budget=0.6")
    disk = (
        "model.device_map={model.embed_tokens:cpu,model.rotary_emb:cpu,model.layers.0:cpu,"
        "model.layers.1:disk,model.norm:disk,lm_head:disk}"
    )
    teachers = []
    real_load = load_model

    def recorded(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        teachers.append(is_mapped(loaded.model))
        return loaded

    import shrink.models

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shrink.models, "load_model", recorded)
        common = [str(folder), "heal=kd", *HEAL, "heal.lr=0.01"]
        assert main(["heal", *common, "--out", str(tmp_path / "whole")]) == 0
        assert main(["heal", *common, disk, "--out", str(tmp_path / "mapped")]) == 0
    assert teachers == [False, True]
    whole, mapped = (shrink.load(tmp_path / name / "model").state_dict() for name in ("whole", "mapped"))
    before = shrink.load(folder / "model").state_dict()
    assert any(not whole[k].equal(before[k]) for k in whole)
    assert all(torch.allclose(mapped[k], whole[k], atol=1e-6) for k in whole)
    assert not (tmp_path / "mapped" / "progress").exists()  # its offload folder went with it

    capsys.readouterr()
    assert main(["heal", str(folder), "heal=lora", *HEAL, "model.device_map=auto"]) == 2
    assert "place the dense teacher of heal=kd; heal=lora has none" in capsys.readouterr().err
    (tmp_path / "refused").mkdir()
    refused = r"compress with heal=none, then `python -m shrink heal"
    fails(tmp_path / "refused", *overrides, "heal=kd", disk, match=refused)


def test_a_model_handed_over_in_memory_distils_from_a_copy_of_itself():
    from shrink.models import load_model

    tiny = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0)
    dense = logits(tiny.model, torch.arange(32).view(1, 32))
    result = shrink.compress(
        tiny.model, tokenizer=tiny.tokenizer, budget=0.6,
        overrides=[*FAST, "eval=none", "heal=kd", *HEAL, "heal.lr=0.01"],
    )  # fmt: skip
    assert result.model is tiny.model and result.metrics["heal"]["steps"] == 8
    assert result.metrics["heal"]["loss_first"] > 0  # the teacher is the dense model, not the student
    assert not torch.allclose(logits(result.model, torch.arange(32).view(1, 32)), dense)


def test_a_model_handed_over_in_memory_is_cached_by_its_weights():
    from shrink.models import load_model

    def healed(seed: int) -> dict:
        tiny = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=seed)
        overrides = [*FAST, "eval=none", "heal=kd", *HEAL, "heal.cache_teacher=true", "heal.cache_top=16"]
        return shrink.compress(tiny.model, tokenizer=tiny.tokenizer, budget=0.6, overrides=overrides).metrics

    assert healed(seed=3)["heal"]["teacher_cache"] == "built"
    assert healed(seed=3)["heal"]["teacher_cache"] == "hit"  # the same weights
    assert healed(seed=4)["heal"]["teacher_cache"] == "built"  # other weights, same windows
