"""`slicegpt`: the shortcut routing computes the skip terms it claims, a full-width rotation keeps
the logits (RMSNorm and LayerNorm families), the sliced stream's widths follow the budget or the
knob with the shortcut matrices counted, checkpoints reload, and bad inputs fail first."""

from __future__ import annotations

import json

import pytest
import torch

import shrink
import shrink.models
import shrink.run.pipeline  # noqa: F401  (bound to the real load_model before a test patches it)
from shrink.methods.slicegpt import SliceGPT
from shrink.modeling_shrink import add_shortcuts
from shrink.models import build_adapter, load_model
from shrink.models.edits import fold_norm

from ..conftest import (
    FAST,
    compress_in_memory,
    fails,
    interrupt_then_resume,
    logits,
    make_cfg,
    tiny_overrides,
)

THREE = "model.tiny.num_hidden_layers=3"  # a middle block reads one basis and writes another


def _dense(model: str):
    cfg = make_cfg(*tiny_overrides(model), THREE)
    return load_model(cfg.model, torch.float32, seed=cfg.seed).model


@pytest.mark.parametrize("embeddings", ["keep", "slice"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-qwen2"])
def test_rotating_the_stream_at_full_width_keeps_the_logits(monkeypatch, model, embeddings):
    """RMSNorm(x·Q) = RMSNorm(x)·Q: folded norms, PCA bases, shortcut matrices, (OPT) the
    LayerNorm turned into a centred RMSNorm and (`slice`) rotated embeddings beside an untied head
    change nothing while no direction is sliced away."""

    def full_width(self, contexts, inputs):
        self.width = self.hidden

    monkeypatch.setattr(SliceGPT, "prepare", full_width)
    overrides = [
        *tiny_overrides(model),
        THREE,
        "method=slicegpt",
        "budget=0.9",
        f"method.embeddings={embeddings}",
    ]
    done = compress_in_memory(*overrides)
    ids = torch.randint(0, 255, (2, 40))
    theirs, ours = logits(_dense(model), ids), logits(done.model, ids)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
    widths = [row["stream"] for row in build_adapter(done.model).block_widths()]
    assert widths == [[64, 64, 64]] * 3


def test_the_shortcut_hooks_route_the_residual_stream():
    """With identity maps the block computes what it did; with attention and MLP silenced it
    computes x·Q_attn·Q_mlp: the skip connections go through the maps and nowhere else."""
    model = _dense("tiny-llama")
    adapter = build_adapter(model)
    block = adapter.blocks()[0]
    taps = adapter.stream_taps()
    fold_norm(block, taps["attn_norm"], adapter.site_paths["attn_in"], 64, center=False)
    fold_norm(block, taps["mlp_norm"], adapter.site_paths["mlp_in"], 64, center=False)
    x = torch.randn(2, 7, 64)
    position = torch.arange(7)[None].expand(2, -1)
    rotary = model.model.rotary_emb(x, position)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return adapter.run_block(block, x, (), {"position_embeddings": rotary, "position_ids": position})

    plain = run()
    add_shortcuts(block, taps, 64, 48, 32)
    with torch.no_grad():
        block.attn_shortcut.weight.copy_(torch.eye(64)[:48])
        block.mlp_shortcut.weight.copy_(torch.eye(48)[:32])
    add_shortcuts(block, taps, 64, 64, 64)  # a block that has them is only resized
    with torch.no_grad():
        block.attn_shortcut.weight.copy_(torch.eye(64))
        block.mlp_shortcut.weight.copy_(torch.eye(64))
    assert torch.allclose(run(), plain, atol=1e-6)
    q_attn, q_mlp = torch.randn(64, 48), torch.randn(48, 32)
    add_shortcuts(block, taps, 64, 48, 32)
    silent = {"self_attn.o_proj": (64, 48), "mlp.gate_proj": (48, 160), "mlp.up_proj": (48, 160)}
    silent["mlp.down_proj"] = (160, 32)
    with torch.no_grad():
        block.attn_shortcut.weight.copy_(q_attn.T)
        block.mlp_shortcut.weight.copy_(q_mlp.T)
        for path, (n_in, n_out) in silent.items():
            linear = torch.nn.Linear(n_in, n_out, bias=False)
            linear.weight.zero_()
            parent, _, name = path.rpartition(".")
            setattr(block.get_submodule(parent), name, linear)
    assert torch.allclose(run(), x @ q_attn @ q_mlp, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_the_budget_slices_one_width_and_counts_the_shortcuts(tmp_path, model):
    done = compress_in_memory(*tiny_overrides(model), THREE, "method=slicegpt", "budget=0.8")
    assert done.achieved <= 0.8
    rows = build_adapter(done.model).block_widths()
    width = rows[0]["stream"][1]
    assert width % 8 == 0 and 0 < width < 64
    assert [row["stream"] for row in rows] == [[64, width, width], [width] * 3, [width, width, 64]]
    blocks = build_adapter(done.model).blocks()  # norms weightless: every parameter is a linear's
    assert done.kept.params == sum(p.numel() for block in blocks for p in block.parameters())
    assert all(block.attn_shortcut.weight.numel() > 0 for block in blocks)
    size = sum(p.numel() for p in done.model.parameters())
    assert size < sum(p.numel() for p in _dense(model).parameters())
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(done.model, ids))


def test_sliced_embeddings_start_the_stream_sliced_and_untie_the_head(tmp_path):
    """`embeddings: slice` (the reference's own scheduler): the embedding is width wide, the first
    block reads it so, the LM head keeps its own full matrix, and the checkpoint reloads in shrink
    and in transformers with the same logits."""
    from transformers import AutoModelForCausalLM

    overrides = [*tiny_overrides("tiny-llama"), THREE, "method=slicegpt", "budget=0.8"]
    done = compress_in_memory(*overrides, "method.embeddings=slice")
    widths = [row["stream"] for row in build_adapter(done.model).block_widths()]
    width = widths[0][0]
    assert width < 64 and widths[0] == [width] * 3 and widths[2] == [width, width, 64]
    assert done.model.get_input_embeddings().weight.shape == (260, width)
    assert done.model.get_output_embeddings().weight.shape == (260, 64)
    assert not done.model.config.tie_word_embeddings
    assert done.achieved <= 0.8
    folder = done.save(tmp_path / "model")
    ids = torch.randint(0, 255, (2, 32))
    ours = logits(done.model, ids)
    assert torch.equal(logits(shrink.load(folder), ids), ours)
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), ids), ours
    )


def test_the_slicing_knob_sets_the_width_and_the_budget_follows():
    done = compress_in_memory(*tiny_overrides("tiny-llama"), THREE, "method=slicegpt", "method.slicing=0.25")
    rows = build_adapter(done.model).block_widths()
    assert rows[1]["stream"] == [48, 48, 48]  # int(0.75·64), a multiple of 8
    assert done.plan.budget == pytest.approx(done.achieved, rel=1e-9)


def test_an_end_to_end_run_saves_a_checkpoint_with_the_logits_it_had(run_job, saved_logits):
    metrics, folder = run_job(*tiny_overrides("tiny-opt"), "method=slicegpt", "budget=0.7")
    assert metrics["budget_achieved"] <= 0.7 and metrics["params_compressed"] < metrics["params_dense"]
    manifest = json.loads((folder / "model" / "config.json").read_text())["shrink_edits"]
    assert {e["kind"] for e in manifest} >= {"shortcuts", "scaled_rms", "linear"}
    reloaded = shrink.load(folder / "model")
    assert torch.equal(logits(reloaded, saved_logits["ids"]), saved_logits["logits"])
    prompt = saved_logits["ids"][:1, :8]  # decoding with a KV cache goes through the same hooks
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))
    card = (folder / "model" / "README.md").read_text()
    assert "stream width (in / mid / out)" in card and "| 0 | 192 | 4 | 4 | – | 64 / " in card
    layers = [json.loads(line) for line in (folder / "layers.jsonl").read_text().splitlines()]
    assert {row["site"] for row in layers} == {"attn", "mlp"}
    assert all(0.0 <= row["rel_error"] < 1.0 for row in layers)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model=tiny-bert", "budget=0.8"], "has not that form"),
        (["model=tiny-llama", "schedule=greedy", "budget=0.8"], "use schedule=uniform"),
        (["model=tiny-llama", "propagate=dense", "budget=0.8"], "needs propagate=compressed"),
        (["model=tiny-llama", "method.slicing=1.5"], r"must lie in \[0, 1\)"),
        (["model=tiny-llama", "method.slicing=0.02"], "more than it saves"),
        (["model=tiny-llama", "budget=0.1"], "cannot be met by method 'slicegpt'"),
        (["model=tiny-llama", "budget=0.8", "quant=gptq", "quant.target=dense"], "quant.target=compressed"),
        (
            ["model=tiny-llama", "budget=0.8", "method.embeddings=slice", "model.device_map=auto"],
            "embeddings=keep",
        ),
    ],
)
def test_bad_inputs_fail_before_loading(tmp_path, overrides, match):
    fails(tmp_path, *FAST, "eval=none", "method=slicegpt", *overrides, match=match)


@pytest.mark.parametrize("embeddings", ["keep", "slice"])
def test_a_run_resumed_after_block_0_ends_with_the_same_model(tmp_path, monkeypatch, run_job, embeddings):
    """The basis of the stream leaving block 0 (and, sliced, the embeddings') is saved with block
    1's inputs and taken back."""
    overrides = [
        *tiny_overrides("tiny-llama"),
        THREE,
        "method=slicegpt",
        "budget=0.7",
        f"method.embeddings={embeddings}",
    ]
    resumed = interrupt_then_resume(monkeypatch, overrides, tmp_path / "resumed")
    straight, _ = run_job(*overrides, name="straight")
    assert resumed["eval"]["ppl"] == straight["eval"]["ppl"]
    ids = torch.randint(0, 255, (2, 32))
    theirs, ours = (shrink.load(tmp_path / name / "model") for name in ("straight", "resumed"))
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


def test_a_residual_stream_of_rank_r_is_kept_exactly_at_width_r(monkeypatch):
    """Embeddings, o_proj and down_proj that write only into an r-dimensional subspace give a
    residual stream of rank r, whose PCA finds that subspace: slicing to width r loses nothing."""
    rank = 32
    basis = torch.linalg.qr(torch.randn(64, rank, generator=torch.Generator().manual_seed(0)))[0]
    keep = basis @ basis.T  # the projector onto the subspace
    real = shrink.models.load_model

    def low_rank_stream(*args, **kwargs):
        loaded = real(*args, **kwargs)
        adapter = loaded.adapter
        with torch.no_grad():
            embedding = loaded.model.get_input_embeddings().weight
            embedding.copy_(embedding @ keep)
            for block in adapter.blocks():
                for path in (adapter.attention_paths.o, adapter.site_paths["mlp_out"][0]):
                    linear = block.get_submodule(path)
                    linear.weight.copy_(keep @ linear.weight)
        return loaded

    monkeypatch.setattr(shrink.models, "load_model", low_rank_stream)
    cfg = make_cfg(*tiny_overrides("tiny-llama"), THREE)
    dense = low_rank_stream(cfg.model, torch.float32, seed=cfg.seed).model
    done = compress_in_memory(*tiny_overrides("tiny-llama"), THREE, "method=slicegpt", "method.slicing=0.5")
    assert [row["stream"] for row in build_adapter(done.model).block_widths()][1] == [rank] * 3
    ids = torch.randint(0, 255, (2, 40))
    theirs, ours = logits(dense, ids), logits(done.model, ids)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


@pytest.mark.parametrize(
    "unit", [["budget_unit=macs"], ["budget_unit=macs", "budget_seq_len=0"], ["budget_unit=bytes"]]
)
def test_the_budget_holds_in_macs_and_bytes(unit):
    """Shortcut matrices cost MACs and bytes too; the attention scores (every head is kept) do not
    shrink, so in MACs at a context the stream is sliced further than the weights alone need."""
    done = compress_in_memory(*tiny_overrides("tiny-llama"), THREE, "method=slicegpt", "budget=0.9", *unit)
    assert done.achieved <= 0.9
    assert build_adapter(done.model).block_widths()[1]["stream"][1] < 64
