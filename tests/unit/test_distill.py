"""`method=distill`: the loss falls, never ends above its initialisation, every input mode runs,
the result reloads, and the runner's teacher stream and row slicing are what the method assumes."""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.blocks.context import BlockContext, BlockResult, take_rows
from shrink.blocks.placement import OnDevice
from shrink.blocks.runner import Runner
from shrink.config import Propagate
from shrink.errors import ShrinkError
from shrink.methods.distill import token_losses
from shrink.models import load_model
from shrink.planning.budget import PlanInputs
from shrink.planning.cost import CostModel
from shrink.planning.schedules import make_plan
from shrink.run.pipeline import run

from ..conftest import TINY, compress_in_memory, logits, make_cfg, tiny_overrides

FAST_DISTILL = ["method=distill", "method.steps=12", "method.eval_every=4"]


def test_token_loss_is_smallest_at_the_target():
    y = torch.randn(2, 5, 8)
    exact = token_losses(y, y)
    assert torch.allclose(exact, torch.full_like(exact, -torch.nn.functional.logsigmoid(torch.tensor(1.0))))
    assert (token_losses(y + 0.1 * torch.randn_like(y), y) > exact).all()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_distillation_lowers_the_calibration_loss(model):
    rows = compress_in_memory(*tiny_overrides(model), *FAST_DISTILL, "method.lr=3e-3", "budget=0.5").rows
    assert rows and all(r["distill_loss"] < r["distill_loss_init"] for r in rows)
    assert all(r["distill_best_step"] > 0 and r["distill_steps"] == 12 for r in rows)


def _block_weights(model):
    return {k: v for k, v in model.state_dict().items() if ".layers." in k}


def test_never_returns_factors_worse_than_the_initialisation():
    """A learning rate that wrecks every step: the best factors seen are the initial ones."""
    base = [*tiny_overrides("tiny-llama"), *FAST_DISTILL, "budget=0.5"]
    init = compress_in_memory(*base, "method.steps=0")
    wild = compress_in_memory(*base, "method.lr=50")
    assert all(r["distill_loss"] <= r["distill_loss_init"] for r in wild.rows)
    assert all(r["distill_best_step"] == 0 for r in wild.rows)
    a, b = _block_weights(init.model), _block_weights(wild.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("inputs", ["teacher", "student", "teacher+student"])
@pytest.mark.parametrize("init", ["svd", "svdllm"])
def test_every_input_mode_and_init_runs_saves_and_reloads(tmp_path, inputs, init):
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"),
        *FAST_DISTILL,
        f"method.inputs={inputs}",
        f"method.init={init}",
        "budget=0.6",
    )
    assert done.achieved <= 0.6
    assert all(r["distill_loss"] <= r["distill_loss_init"] for r in done.rows)
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(done.model, ids))


@pytest.mark.parametrize("model", TINY)
def test_distill_runs_on_every_family(model):
    assert compress_in_memory(*tiny_overrides(model), *FAST_DISTILL, "budget=0.6").achieved <= 0.6


def test_greedy_plans_distill_from_its_initialisation():
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), *FAST_DISTILL, "schedule=greedy", "schedule.min_keep=0.1", "budget=0.6"
    )
    assert done.achieved <= 0.6


@pytest.mark.parametrize(
    "override,words",
    [
        ("method.inputs=both", ["both", "teacher+student"]),
        ("method.batch_size=8", ["method.batch_size=8", "calib.batch_size=2"]),
        ("method.steps=-1", ["method.steps"]),
        ("method.lr=0", ["method.lr"]),
    ],
)
def test_bad_distill_settings_fail_before_loading(tmp_path, override, words):
    folder = tmp_path / "run"
    with pytest.raises(ShrinkError) as err:
        run(make_cfg(*tiny_overrides("tiny-llama"), "method=distill", override), run_dir=folder)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)
    assert not folder.exists()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
def test_a_slice_of_a_batch_runs_like_the_whole_batch(model):
    """take_rows slices masks and per-window tensors and leaves broadcast ones alone."""
    cfg = make_cfg(*tiny_overrides(model))
    loaded = load_model(cfg.model, torch.float32, seed=0)
    adapter = loaded.adapter
    windows = torch.randint(0, 255, (3, 16))
    seen = {}

    def record(ctx: BlockContext) -> BlockResult:
        seen["full"] = ctx.run(ctx.hidden[0], 0)
        seen["part"] = ctx.run(ctx.hidden[0][1:3], 0, slice(1, 3))
        return BlockResult([], {})

    cpu = torch.device("cpu")
    with torch.no_grad():
        for ctx in Runner(adapter, windows, 3, cpu, OnDevice(cpu)).blocks(Propagate.dense):
            record(ctx)
    assert torch.allclose(seen["part"], seen["full"][1:3], atol=1e-5)
    sliced = take_rows({"a": (torch.ones(3, 2), torch.ones(1, 2)), "b": None}, slice(0, 1), 3)
    assert sliced["a"][0].shape == (1, 2) and sliced["a"][1].shape == (1, 2) and sliced["b"] is None


def test_the_teacher_stream_is_the_dense_models_hidden_states():
    """With compressed propagation the method still sees the dense model's block inputs/outputs."""
    cfg = make_cfg(*tiny_overrides("tiny-llama"))
    loaded = load_model(cfg.model, torch.float32, seed=0)
    adapter, model = loaded.adapter, loaded.model
    windows = torch.randint(0, 255, (2, 16))
    with torch.no_grad():
        dense = model(input_ids=windows, output_hidden_states=True).hidden_states
    seen = []

    def zero_out_mlp(ctx: BlockContext) -> BlockResult:
        seen.append((ctx.teacher_hidden[0].clone(), ctx.teacher_outputs[0].clone(), ctx.hidden[0].clone()))
        down = ctx.block.get_submodule("mlp.down_proj")
        with torch.no_grad():
            down.weight.mul_(0.5)  # the compressed stream drifts away from the dense one
        return BlockResult([], {})

    plan = make_plan("uniform", PlanInputs(CostModel(adapter).table(), 1.0, True))
    cpu = torch.device("cpu")
    for ctx in Runner(adapter, windows, 2, cpu, OnDevice(cpu)).blocks(
        Propagate.compressed, plan, teacher=True
    ):
        zero_out_mlp(ctx)
    assert len(seen) == len(adapter.blocks())
    for i, (teacher_in, teacher_out, _) in enumerate(seen):
        assert torch.allclose(teacher_in, dense[i], atol=1e-5)
        if i + 1 < len(seen):  # the last hidden state of HF models has the final norm applied
            assert torch.allclose(teacher_out, dense[i + 1], atol=1e-5)
    assert not torch.allclose(seen[-1][2], seen[-1][0], atol=1e-3)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
def test_only_the_blocks_stay_behind_when_the_rest_moves_to_an_accelerator(model):
    """The runner's accelerator layout, checked with the meta device standing in for a GPU."""
    from shrink.blocks.placement import place_except_blocks

    loaded = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0)
    adapter = loaded.adapter
    place_except_blocks(adapter, torch.device("meta"))
    inside = {id(p) for block in adapter.blocks() for p in block.parameters()}
    assert inside and all(p.device.type == "cpu" for block in adapter.blocks() for p in block.parameters())
    outside = [p for p in adapter.model.parameters() if id(p) not in inside]
    assert outside and all(p.device.type == "meta" for p in outside)
    head, embed = adapter.model.get_output_embeddings(), adapter.model.get_input_embeddings()
    if head is not None and adapter.model.config.tie_word_embeddings:
        assert head.weight is embed.weight  # tied weights stay one tensor
