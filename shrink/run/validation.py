"""Every check of a run's config that needs no weights, so bad input fails with one line before
anything expensive starts, and before a run folder exists: under the launcher the checks run
(`shrink.run.cli.CheckFirst`, a Hydra callback) before Hydra creates the run folder and its parents."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..blocks import steps
from ..blocks.context import BlockContext
from ..config import ErrorCurrency, Propagate, Source, named_keys
from ..data import corpora as data
from ..data import hub
from ..errors import ShrinkError, first_line
from ..evaluation import glue_hub
from ..evaluation.suite import check_suite
from ..hardware.devices import resolve_device
from ..heal import checks as heal_checks
from ..methods import METHODS, Method, build_method, check_method
from ..models import Adapter, load_config, skeleton
from ..models.catalog import check_label
from ..models.device_map import check_block_map, check_device_map
from ..models.streaming import check_streamable
from ..planning.cost import CostModel
from ..planning.inputs import cost_model, error_currency, plan_inputs
from ..planning.schedules import (
    check_schedule,
    least_kept,
    make_plan,
    needs_profiles,
    needs_scores,
    searches,
)
from .tracking import check_logger


def check_known_keys(node: Any, where: str = "") -> None:
    """Reject keys that no schema declares, including ones forced in with Hydra's `+key=` syntax."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in node:
            if key not in known and not (where == "" and key == "hydra"):
                raise ShrinkError(
                    f"unknown config key {where + str(key)!r}; valid keys here: {', '.join(sorted(known))}"
                )
    for key in node:
        if not (where == "" and key == "hydra"):
            check_known_keys(node[key], f"{where}{key}.")


def launch_overrides() -> tuple[list[str], bool]:
    """The command line's overrides of the job being run, and whether it is one job of a sweep
    (([], False) outside Hydra: the Python API, tests)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return [], False
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN


def validate(cfg: DictConfig, launch: tuple[list[str], bool] | None = None) -> None:
    """Every check that needs no weights, so bad input fails before expensive work (about half a
    second on the default model; the launcher runs them before the run folder exists, the job
    again). `launch`: the command line's overrides and whether the job is part of a sweep (by
    default Hydra's record), which tell keys a user set apart from defaults."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ShrinkError(
            f"model={Source(cfg.model.source).value} needs model.path=<a folder with config.json and "
            "safetensors weights, or a .gguf file for model=gguf>"
        )
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. model=bert-glue without eval=glue-hub
        raise ShrinkError(f"the config does not resolve: {first_line(err)}") from None
    overrides, multirun = launch if launch is not None else launch_overrides()
    _checks(cfg, overrides, multirun)


def _checks(cfg: DictConfig, overrides: list[str], multirun: bool) -> None:
    check_known_keys(cfg)
    check_label(cfg.model)
    steps.check_unused_keys(cfg, overrides, multirun)
    if cfg.resume and cfg.overwrite:
        raise ShrinkError("resume=true continues a run folder, overwrite=true starts it afresh: choose one")
    if not 0.0 < float(cfg.budget) <= 1.0:
        raise ShrinkError(f"budget {cfg.budget} is outside (0, 1]: it is the fraction of block weights kept")
    check_method(cfg.method.name)
    knob = METHODS[cfg.method.name].knob
    if knob is not None and cfg.method.get(knob) is not None and "budget" in named_keys(overrides):
        raise ShrinkError(
            f"method.{knob}={cfg.method[knob]} sets how much {cfg.method.name} keeps, and so the budget: "
            f"drop budget={cfg.budget} or method.{knob}"
        )
    steps.check(cfg, METHODS[cfg.method.name].factorises)
    heal_checks.check(cfg, overrides, multirun)
    if cfg.heal.name != "none" and cfg.model.get("device_map") is not None:
        raise ShrinkError(
            "heal trains the compressed model on one device, and model.device_map spreads it: compress "
            f"with heal=none, then `python -m shrink heal <run> heal={cfg.heal.name}`, whose dense teacher "
            "keeps the run's model.device_map"
        )
    METHODS[cfg.method.name].check(cfg.method, int(cfg.calib.batch_size), Propagate(cfg.propagate).value)
    check_schedule(cfg.schedule.name)
    if METHODS[cfg.method.name].rotates_stream:
        if cfg.schedule.name != "uniform":
            raise ShrinkError(
                f"method {cfg.method.name!r} slices the residual stream to one width across the blocks, "
                f"which it chooses from the budget itself; use schedule=uniform, not {cfg.schedule.name!r}"
            )
        if cfg.method.get("embeddings") == "slice" and cfg.model.get("device_map") is not None:
            raise ShrinkError(
                "method.embeddings=slice rewrites the embeddings and unties the LM head, which "
                "model.device_map may have offloaded; use method.embeddings=keep or no device map"
            )
        if cfg.quant.name != "none" and cfg.quant.get("target") == "dense":
            raise ShrinkError(
                f"quant.target=dense fits each block to the dense model's stream, which method "
                f"{cfg.method.name!r} has rotated and sliced; use quant.target=compressed"
            )
    if needs_profiles(cfg.schedule.name) and not METHODS[cfg.method.name].has_profile:
        with_profiles = sorted(n for n, m in METHODS.items() if m.has_profile)
        raise ShrinkError(
            f"schedule {cfg.schedule.name!r} allocates by the method's error profile, which method "
            f"{cfg.method.name!r} does not provide; methods that do: {', '.join(with_profiles)}"
        )
    if needs_scores(cfg.schedule.name) and not METHODS[cfg.method.name].scores_units:
        with_scores = sorted(n for n, m in METHODS.items() if m.scores_units)
        raise ShrinkError(
            f"schedule {cfg.schedule.name!r} compares the units' scores, which method {cfg.method.name!r} "
            f"does not give; methods that do: {', '.join(with_scores)}"
        )
    method_class = METHODS[cfg.method.name]
    if method_class.removes_blocks:
        if not needs_profiles(cfg.schedule.name):
            raise ShrinkError(
                f"method {cfg.method.name!r} removes whole blocks, chosen across the model by a planning "
                f"pass, which schedule {cfg.schedule.name!r} does not run; use schedule=threshold (its "
                "default), greedy or energy"
            )
        if cfg.stream or cfg.model.get("device_map") is not None:
            raise ShrinkError(
                f"method {cfg.method.name!r} removes whole blocks, which stream=true and model.device_map "
                "(blocks kept in files or spread over devices) do not support yet; run it on a resident model"
            )
    if method_class.needs_gradients and (cfg.stream or cfg.model.get("device_map") is not None):
        raise ShrinkError(
            f"method {cfg.method.name!r} runs the calibration loss backward through the whole model (its "
            "gradients take 4 bytes per block weight beside one batch's activations), which stream=true and "
            "model.device_map do not support; run it on a resident model"
        )
    if searches(cfg.schedule.name):
        _check_search(cfg)
    error = error_currency(cfg)
    if error != ErrorCurrency.unit and not METHODS[cfg.method.name].residual_units:
        with_energies = sorted(n for n, m in METHODS.items() if m.residual_units)
        raise ShrinkError(
            f"schedule.error={error.value} compares units by their share of the residual stream, which "
            f"method {cfg.method.name!r} does not report (methods that do: {', '.join(with_energies)}); "
            "use schedule.error=unit"
        )
    min_keep = cfg.schedule.get("min_keep")
    if min_keep is not None and not 0.0 <= float(min_keep) <= float(cfg.budget):
        raise ShrinkError(
            f"schedule.min_keep={min_keep} must lie in [0, budget={cfg.budget}]: every unit keeps at "
            "least that share, so a larger floor cannot meet the budget; lower schedule.min_keep or "
            "use schedule=uniform"
        )
    if cfg.budget_seq_len < 0:
        raise ShrinkError(f"budget_seq_len must be ≥ 0 (0: count linears only), got {cfg.budget_seq_len}")
    for key in ("nsamples", "seq_len", "batch_size"):
        if cfg.calib[key] <= 0:
            raise ShrinkError(f"calib.{key} must be positive, got {cfg.calib[key]}")
    folds = int(cfg.method.get("ridge_cv", 0))
    if folds > cfg.calib.nsamples:
        raise ShrinkError(
            f"method.ridge_cv={folds} deals the calibration windows into {folds} groups, but "
            f"calib.nsamples={cfg.calib.nsamples}; raise calib.nsamples or lower method.ridge_cv "
            "(0: the fixed ridge)"
        )
    if not 0 < cfg.calib.profile_share <= 1:
        raise ShrinkError(
            f"calib.profile_share={cfg.calib.profile_share} must lie in (0, 1]: the share of the "
            "calibration windows the planning pass reads (1: all of them)"
        )
    data.check_corpus(cfg.calib.corpus)
    check_logger(cfg.logger)
    check_suite(cfg)
    if cfg.stream:
        check_stream(cfg)
    check_mapping(cfg)
    check_push(cfg)
    ppl = cfg.eval.get("ppl")
    resolve_device(cfg.device)
    config = load_config(cfg.model)
    blocks = skeleton(cfg.model, config)
    check_block_map(cfg.model, blocks)
    steps.check_widths(cfg, list(blocks.blocks()), [blocks.sites(b) for b in blocks.blocks()])
    check_reachable(cfg, blocks)
    heal_checks.check_model(cfg.heal, blocks)
    if cfg.eval.get("glue_hub") is not None:
        glue_hub.check_model(str(cfg.eval.glue_hub.task), int(config.num_labels))
    limit = getattr(config, "max_position_embeddings", None)
    windows = {"calib.seq_len": cfg.calib.seq_len}
    if ppl is not None:
        windows["eval.ppl.seq_len"] = ppl.seq_len
    if cfg.eval.get("speed") is not None:
        windows["eval.speed.seq_len"] = cfg.eval.speed.seq_len
    for key, length in windows.items():
        if limit is not None and length > limit:
            raise ShrinkError(
                f"{key}={length} is longer than the context of model {cfg.model.name!r} ({limit} tokens)"
            )


def check_stream(cfg: DictConfig) -> None:
    """What `stream=true` cannot do: it needs shards to read, and evaluates perplexity only."""
    check_streamable(cfg.model)
    whole = [k for k in ("zeroshot", "speed", "glue", "glue_hub") if cfg.eval.get(k) is not None]
    if whole:
        raise ShrinkError(
            f"stream=true evaluates perplexity only (block by block); eval {cfg.eval.name!r} also runs "
            f"{', '.join(whole)}, which need the whole model: use eval=ppl or eval=none, then evaluate "
            "the saved checkpoint"
        )
    if not cfg.block_checkpoints:
        raise ShrinkError(
            "stream=true keeps the compressed blocks in <run>/progress: set block_checkpoints=true"
        )


def check_push(cfg: DictConfig) -> None:
    """`push_to_hub` uploads the saved checkpoint, so it needs one and a hub that answers."""
    if cfg.push_to_hub is None:
        return
    if not cfg.save_model:
        raise ShrinkError(f"push_to_hub={cfg.push_to_hub} uploads <run>/model, but save_model=false")
    if not hub.reachable():
        raise ShrinkError(
            f"push_to_hub={cfg.push_to_hub} needs a model hub, and none answers (offline or "
            "HF_HUB_OFFLINE=1); drop it and upload <run>/model later"
        )


def check_mapping(cfg: DictConfig) -> None:
    """`model.device_map` needs weights on disk for accelerate to place, and excludes streaming."""
    check_device_map(cfg.model)
    if cfg.model.device_map is None:
        return
    if cfg.model.source in ("tiny", "memory"):
        raise ShrinkError(
            "model.device_map places weights read from files; a tiny random model or a model in memory "
            "has none: save it and use model=local"
        )
    if cfg.stream:
        raise ShrinkError("model.device_map and stream=true exclude each other: pick one way to place blocks")


def check_reachable(cfg: DictConfig, adapter: Adapter) -> None:
    """The budget against what the method can keep, priced on the architecture alone: the
    corrections' reserve, a fixed schedule's plan, and the sizes the method may take (widths in
    multiples of the quantization group or N:M span, min_keep), so that a budget out of reach
    fails here rather than after the dense evaluation and the planning pass."""
    method = build_method(cfg.method)
    method.width_multiple = steps.width_multiple(cfg)
    method.check_model(adapter)
    costs = cost_model(cfg, adapter)
    contexts = shape_contexts(adapter, costs)
    apply_knob(cfg, method, contexts, costs)
    planned = plan_inputs(cfg, costs, method.prunes_heads)
    method.prepare(contexts, planned)
    plan = None if needs_profiles(cfg.schedule.name) else make_plan(cfg.schedule.name, planned)
    sizes = [size for ctx in contexts for size in (method.sizes(ctx) or [])]
    short = least_kept(planned, sizes, plan) if sizes else None
    if short is None:
        return
    least, asked, block = short
    where = f"block {block} keeps" if block is not None else "the blocks keep"
    multiple = method.width_multiple
    why = []
    if multiple > 1:
        why.append(f"the widths it keeps come in multiples of {multiple}, {_width_cause(cfg)}")
    if block is None and planned.min_keep > 0:
        why.append(f"no unit keeps less than schedule.min_keep={planned.min_keep:g}")
    fixes = ["raise the budget"]
    if multiple > 1:
        fixes.append(
            "use a smaller quant.group_size" if cfg.quant.name != "none" else "use another sparsity.pattern"
        )
    if block is None and planned.min_keep > 0:
        fixes.append("lower schedule.min_keep")
    raise ShrinkError(
        f"budget {cfg.budget:g} cannot be met by method {cfg.method.name!r} under schedule "
        f"{cfg.schedule.name!r} on model {cfg.model.name!r}: {where} at least {least:.4f} of the block "
        f"cost, {asked:.4f} asked{' (' + '; '.join(why) + ')' if why else ''}; {' or '.join(fixes)}"
    )


def shape_contexts(adapter: Adapter, costs: CostModel) -> list[BlockContext]:
    """A context per block without statistics: what methods price their sizes from."""
    return [
        BlockContext(
            index=i,
            block=block,
            sites=adapter.sites(block),
            stats={},
            targets={},
            choices={},
            attention=adapter.attention(block),
            costs=costs,
            forward=adapter.run_block,
            hidden=[],
            args=[],
            kwargs=[],
        )
        for i, block in enumerate(adapter.blocks())
    ]


def apply_knob(cfg: DictConfig, method: Method, contexts: list[BlockContext], costs: CostModel) -> None:
    """A method's own knob, when set, decides how much it removes: the run's budget becomes the
    share it keeps (so the plan, the reports and the check achieved ≤ requested all follow it)."""
    if method.knob is None or cfg.method.get(method.knob) is None:
        return
    kept = method.native_budget(contexts, plan_inputs(cfg, costs, method.prunes_heads))
    if kept is not None:
        cfg.budget = costs.budget_of(kept) * (1 + 1e-12)  # rounding must not cost a unit


def _width_cause(cfg: DictConfig) -> str:
    """What forces the widths: the quantization group and/or the N:M span."""
    causes = []
    if cfg.quant.name != "none" and int(cfg.quant.group_size) > 1:
        causes.append(
            f"as quant={cfg.quant.name} packs whole groups of quant.group_size={cfg.quant.group_size}"
        )
    if cfg.sparsity.name != "none" and str(cfg.sparsity.pattern) != "unstructured":
        causes.append(f"as sparsity.pattern={cfg.sparsity.pattern} needs whole spans")
    return " and ".join(causes)


def _check_search(cfg: DictConfig) -> None:
    """`schedule=search` swaps candidate blocks into the whole model to score each plan."""
    if cfg.stream or cfg.model.get("device_map") is not None:
        raise ShrinkError(
            "schedule=search scores each plan on the whole model in memory, which stream=true and "
            "model.device_map (blocks kept in files or spread over devices) do not hold; use "
            "schedule=greedy-residual"
        )
    if METHODS[cfg.method.name].removes_blocks:
        raise ShrinkError(
            f"schedule=search moves cost between units of blocks; method {cfg.method.name!r} removes "
            "whole blocks"
        )
    for key in ("evaluations", "offspring", "moves", "reach", "windows"):
        if int(cfg.schedule[key]) < 1:
            raise ShrinkError(f"schedule.{key}={cfg.schedule[key]} must be a positive number")
    if not 0.0 < float(cfg.schedule.step) <= 1.0:
        raise ShrinkError(
            f"schedule.step={cfg.schedule.step} must lie in (0, 1]: a share of a unit's dense cost"
        )
