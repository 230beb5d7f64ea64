"""One run: validate → load → evaluate dense → calibrate+compress → save → evaluate → log."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..blocks import steps
from ..blocks.gradients import taylor_saliences
from ..blocks.runner import Runner, autocast_dtype
from ..checkpoints import save_load as checkpoint
from ..config import Propagate
from ..data import corpora as data
from ..data import hub
from ..errors import ShrinkError
from ..evaluation.suite import evaluate_suite, score_perplexity
from ..hardware import memory as rss
from ..hardware.devices import resolve_device
from ..heal import HEALERS
from ..methods import Method, build_method
from ..planning.budget import PlanInputs
from ..planning.cost import CostModel
from ..planning.inputs import cost_model, plan_inputs
from ..planning.schedules import make_plan, needs_profiles, searches
from .identity import differences, identity, plain
from .lock import locked
from .outputs import RunFolder, check_reuse, read_metrics, remove_if_empty, write_failed
from .progress import Progress
from .provenance import provenance
from .search import searched_plan
from .store import BlockStore, open_store
from .summary import closing_summary
from .tracking import Tracker, make_tracker
from .validation import shape_contexts, validate

log = logging.getLogger("shrink")


def _run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _run_name_and_group(cfg: DictConfig) -> tuple[str, str | None]:
    """W&B run name: the model actually loaded, method, schedule and budget; in a sweep, the job's
    overrides (what tells its jobs apart), in a group named after the sweep folder unless
    `logger.group` sets one."""
    name = f"{cfg.model.name}-{cfg.method.name}-{cfg.schedule.name}-b{cfg.budget}"
    group = cfg.logger.get("group")
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            name = hydra_cfg.job.override_dirname or name
            group = group if group is not None else Path(hydra_cfg.sweep.dir).name
    except ValueError:  # not under Hydra (tests, the Python API)
        pass
    return name, group


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _dtype(cfg: DictConfig) -> torch.dtype:
    return getattr(torch, str(getattr(cfg.dtype, "value", cfg.dtype)))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass
class Finished:
    """What one job leaves in memory: its metrics and, unless it streamed its blocks or skipped a
    finished run, the compressed model with its tokenizer."""

    metrics: dict[str, Any]
    model: Any = None
    tokenizer: Any = None


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float | None:
    """Run one job; returns the objective (compressed perplexity on the first eval corpus)."""
    return _objective(run_job(cfg, run_dir).metrics)


def run_job(cfg: DictConfig, run_dir: str | Path | None = None) -> Finished:
    """Run one job (what `launch.py` and `shrink.compress` run). The run folder is locked for the
    whole run: a second process there fails at once, writing nothing."""
    folder = RunFolder(_run_dir(run_dir))
    with locked(folder.path):
        return _run(cfg, folder)


def _run(cfg: DictConfig, folder: RunFolder) -> Finished:
    try:
        validate(cfg)
        check_reuse(folder.path, cfg)
        previous = finished_run(folder.path, cfg) if cfg.resume else None
        if previous is not None:
            print(f"shrink: {folder.path} has finished already with this config (resume=true): skipped")
            return Finished(previous)
        progress = Progress(folder.path, identity(cfg, ignore=("eval",)))
        done = progress.finished() if cfg.resume else -1
    except BaseException:  # nothing began: leave no folder that looks like a run
        remove_if_empty(folder.path)
        raise
    if not cfg.resume:
        progress.clear()
    clock = {"start": time.perf_counter()}
    rss.reset_peak()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = _dtype(cfg)
    folder.start(cfg)
    tracker = make_tracker(cfg.logger)
    try:
        tracker.start(folder.path, OmegaConf.to_container(cfg, resolve=True), *_run_name_and_group(cfg))
        with open_store(cfg, folder.path, device, dtype, progress) as store:
            clock["loaded"] = time.perf_counter()
            metrics = _compress_and_evaluate(cfg, store, Job(folder, tracker, progress, done, clock))
            kept = (None, None) if cfg.stream else (store.model, store.tokenizer)
        for plot in folder.finish(metrics):
            tracker.log_image(plot.stem, plot)
        tracker.log_metrics(metrics)
        tracker.finish("ok")
        progress.clear()
    except BaseException as err:
        tracker.finish("failed")
        write_failed(folder.path, cfg, err)
        raise
    print(closing_summary(metrics, folder.path))
    if tracker.closing_line():
        print(tracker.closing_line())
    if cfg.push_to_hub is not None:
        print(f"  pushed     {hub.push(folder.path / 'model', cfg.push_to_hub)}")
    return Finished(metrics, *kept)


@dataclasses.dataclass
class Job:
    """What the stages of one run share besides the config and the store."""

    folder: RunFolder
    tracker: Tracker
    progress: Progress
    done: int  # last block finished by an earlier attempt (resume), -1 for none
    clock: dict[str, float]  # perf_counter at each stage boundary
    search: dict[str, Any] | None = None  # what schedule=search did


def _compress_and_evaluate(cfg: DictConfig, store: BlockStore, job: Job) -> dict[str, Any]:
    """Dense scores → compression → checks and checkpoint → compressed scores; returns metrics."""
    device = store.device
    method = build_method(cfg.method)
    method.width_multiple = steps.width_multiple(cfg)
    method.check_model(store.adapter)
    costs = cost_model(cfg, store.adapter)
    inputs = plan_inputs(cfg, costs, method.prunes_heads)
    method.prepare(shape_contexts(store.adapter, costs), inputs)
    params_dense, dense_cost = _params(store.model), costs.model()
    results: dict[str, Any] = {}
    evaluate_suite(cfg, store, False, results, job.folder.path)
    job.clock["dense_eval"] = time.perf_counter()
    healing = cfg.heal.name != "none"
    # a model handed over in memory cannot be loaded again: the distillation teacher is a copy
    teacher = (
        copy.deepcopy(store.model)
        if healing and HEALERS[cfg.heal.name].needs_teacher and cfg.model.source == "memory"
        else None
    )
    post = steps.BlockSteps(cfg.quant, cfg.sparsity)
    removed = _compress(cfg, store, method, costs, inputs, job, post if not healing else None)
    entry = method.embedding_basis()
    if entry is not None:  # the stream starts sliced: the embeddings take its basis
        store.adapter.rotate_embeddings(entry)
    job.clock["compressed"] = time.perf_counter()
    stored = store.end_compression()  # where the compressed blocks are read from for saving
    if removed:  # whole blocks a method removed (validation keeps such methods to resident models)
        store.adapter.remove_blocks(removed)
    kept_cost = costs.model()
    unit = inputs.unit
    achieved = kept_cost.of(unit) / dense_cost.of(unit)
    if achieved > float(cfg.budget) + 1e-9:
        raise RuntimeError(f"achieved budget {achieved:.6f} exceeds the requested {cfg.budget} (a bug)")
    healed = None
    if healing:  # then the steps, on the healed weights
        healed = _heal(cfg, store, job, results, teacher)
        teacher = None
        job.clock["healed"] = time.perf_counter()
        if post.active:
            _apply_steps(cfg, store, post, costs, job)
    if cfg.save_model:
        info = {
            "model": cfg.model.name,
            "method": cfg.method.name,
            "budget": float(cfg.budget),
            "blocks": store.adapter.block_widths(),
        }
        quant = OmegaConf.to_container(cfg.quant) if cfg.quant.name != "none" else None
        checkpoint.save(
            store.model, store.tokenizer, job.folder.path / "model", cfg.model.head, info, stored, quant
        )
    job.clock["saved"] = time.perf_counter()
    evaluate_suite(cfg, store, True, results, job.folder.path)
    job.clock["end"] = time.perf_counter()
    clock = job.clock
    return {
        "status": "ok",
        "model": cfg.model.name,
        "method": cfg.method.name,
        "schedule": cfg.schedule.name,
        "budget": float(cfg.budget),
        "budget_unit": unit.value,
        "budget_seq_len": costs.seq_len,
        "budget_achieved": achieved,
        "params_dense": params_dense,
        "params_compressed": _params(store.model),
        "block_params_dense": dense_cost.params,
        "block_params_compressed": kept_cost.params,
        "block_macs_dense": dense_cost.macs,
        "block_macs_compressed": kept_cost.macs,
        "compress_seconds": clock["compressed"] - clock["dense_eval"],
        **({"heal": healed} if healed is not None else {}),
        **({"search": job.search} if job.search is not None else {}),
        "resumed_after_block": job.done if job.done >= 0 else None,
        "load_seconds": clock["loaded"] - clock["start"],
        "eval_seconds": (clock["dense_eval"] - clock["loaded"]) + (clock["end"] - clock["saved"]),
        "total_seconds": clock["end"] - clock["start"],
        "peak_rss_mb": rss.peak_mb(),
        "checkpoint_mb": _folder_mb(job.folder.path / "model") if cfg.save_model else None,
        **steps.steps_summary(cfg, store.adapter, stored),
        "seed": cfg.seed,
        "device": device.type,
        "device_map": store.device_summary(),
        "stream": bool(cfg.stream),
        "propagate": Propagate(cfg.propagate).value,
        "calib": {"corpus": cfg.calib.corpus, "nsamples": cfg.calib.nsamples, "seq_len": cfg.calib.seq_len},
        "eval": results,
        "versions": provenance(),
    }


def _calibration_windows(cfg: DictConfig, store: BlockStore) -> torch.Tensor:
    return data.calibration_windows(
        cfg.calib.corpus, store.tokenizer, cfg.calib.nsamples, cfg.calib.seq_len, cfg.seed, cfg.model.add_bos
    )


def _compress(
    cfg: DictConfig,
    store: BlockStore,
    method: Method,
    costs: CostModel,
    inputs: PlanInputs,
    job: Job,
    post: steps.BlockSteps | None,
) -> list[int]:
    """Plan (profiling first when the schedule needs it), then compress block by block, each
    finished block recorded (and checkpointed) as it comes, with the sparsity and quantization
    steps `post` after the method in each block; a resumed run starts after job.done. Returns the
    blocks the method removed whole (their rows say `removed`)."""
    adapter, device = store.adapter, store.device
    windows = _calibration_windows(cfg, store)
    saliences = None
    if method.needs_gradients:  # a backward pass through the whole dense model, before any edit
        store.ready_for_evaluation()
        saliences = taylor_saliences(adapter, windows, cfg.calib.batch_size, device)
    store.begin_compression()
    runner = Runner(
        adapter, windows, cfg.calib.batch_size, device, store.placement, costs,
        method.new_stats, saliences, dense_pass=not method.rotates_stream,
        autocast=autocast_dtype(cfg.calib.autocast),
        scratch=job.progress.path / "scratch" if cfg.stream else None,  # wide statistics set aside
    )  # fmt: skip
    if needs_profiles(cfg.schedule.name):  # the planning pass: the dense model's statistics
        planner = runner.for_planning(cfg.calib.profile_share, autocast_dtype(cfg.calib.profile_autocast))
        inputs.curves = [
            curve for ctx in planner.blocks(Propagate.dense, desc="profile") for curve in method.profile(ctx)
        ]
    plan = make_plan(cfg.schedule.name, inputs)
    if searches(cfg.schedule.name):  # the seed plan, refined on the model
        plan, job.search = searched_plan(cfg, store, runner, method, inputs, method.needs_teacher)
    job.folder.add_plan(plan.rows())
    job.tracker.log_plan(plan.rows())

    start_inputs = None
    removed: list[int] = []
    if job.done >= 0:  # resume: rebuild the finished blocks, feed the next one its saved inputs
        records, hidden, teacher, carried = store.restore(job.progress, job.done)
        method.carry(carried)
        for index, (rows, spectra) in enumerate(records):
            removed += [index] if any(row.get("removed") for row in rows) else []
            job.folder.add_block(index, rows, spectra)
            job.tracker.log_block(index, rows, spectra)
        start_inputs = (hidden, teacher)
        log.info("resuming after block %d of %d", job.done, len(adapter.blocks()))
    post = post if post is not None and post.active else None
    teacher = method.needs_teacher or (post is not None and post.needs_teacher)
    blocks = runner.blocks(
        Propagate(cfg.propagate), plan, teacher, start=job.done + 1, start_inputs=start_inputs
    )
    with contextlib.closing(blocks):  # on an error or Ctrl-C the walk (and its progress bar) ends here
        for ctx in blocks:
            result = method.compress_block(ctx)
            removed += [ctx.index] if ctx.removed else []
            step_rows = post.apply(ctx) if post is not None and not ctx.removed else []
            hidden, teacher, seconds = runner.advance(ctx)
            memory = {"rss_mb": round(rss.current_mb(), 1), "peak_rss_mb": round(rss.peak_mb(), 1)}
            rows = [{"block": ctx.index, **row, "block_seconds": seconds, **memory} for row in result.records]
            job.folder.add_block(ctx.index, rows, result.spectra)
            job.folder.add_steps([{"block": ctx.index, **row} for row in step_rows])
            job.tracker.log_block(ctx.index, rows, result.spectra)
            if cfg.block_checkpoints:
                job.progress.save_block(
                    ctx.index, store.model, adapter, cfg.model.head, rows, result.spectra, hidden, teacher,
                    method.carried(),
                )  # fmt: skip
    return removed


def _heal(
    cfg: DictConfig, store: BlockStore, job: Job, results: dict[str, Any], teacher: torch.nn.Module | None
) -> dict[str, Any]:
    """Score the compressed model's perplexities (`before_heal`), then heal it in place; returns
    the heal's summary. Trainer's checkpoints live in progress/, so `resume=true` goes on mid-heal."""
    from ..heal.recover import heal  # peft and transformers' Trainer load only when a run heals
    from ..heal.teacher_cache import dense_teacher

    store.ready_for_evaluation()
    score_perplexity(cfg, store, "before_heal", results)
    dense, identity = dense_teacher(cfg.model, _dtype(cfg), int(cfg.seed), teacher)
    return heal(
        store.adapter, store.tokenizer, dense, cfg.heal, bool(cfg.model.add_bos), store.device,
        job.progress.path / "heal", job.folder.path / "heal.jsonl", job.tracker.log_heal,
        teacher_identity=identity,
    )  # fmt: skip


def _apply_steps(
    cfg: DictConfig, store: BlockStore, post: steps.BlockSteps, costs: CostModel, job: Job
) -> None:
    """The sparsity and quantization steps on the healed model: one more pass over the
    calibration windows, block by block, each block's sites sparsified and quantized on the
    stream of the blocks below as they were left."""
    store.begin_compression()
    runner = Runner(
        store.adapter, _calibration_windows(cfg, store), cfg.calib.batch_size, store.device, store.placement,
        costs, dense_pass=False,
    )  # fmt: skip
    blocks = runner.blocks(Propagate.compressed, desc="steps")
    with contextlib.closing(blocks):
        for ctx in blocks:
            rows = post.apply(ctx)
            runner.advance(ctx)
            job.folder.add_steps([{"block": ctx.index, **row} for row in rows])
    store.end_compression()


def _objective(metrics: dict[str, Any]) -> float | None:
    """What a sweeper minimises: the compressed perplexity on the first corpus, if any."""
    ppl = metrics.get("eval", {}).get("ppl")
    return next(iter(ppl.values()))["compressed"] if ppl else None


def finished_run(path: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The metrics of a run that finished ok in `path`, or None; a finished run whose config
    differs from `cfg` is refused (its metrics answer another question)."""
    previous = read_metrics(path)
    if previous is None or previous.get("status") != "ok":
        return None
    try:
        saved = plain(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ShrinkError(f"cannot resume {path}: its config.yaml is unreadable ({err})") from None
    differ = differences(saved, identity(cfg))
    if differ:
        raise ShrinkError(
            f"cannot resume {path}: it finished under a different config (differs in: {', '.join(differ)}); "
            "resume with the same overrides or use a new folder"
        )
    return previous
