"""One run: validate → load → evaluate dense → calibrate+compress → save → evaluate → log."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import checkpoint, data, hub, rss, steps
from .budget import PlanInputs
from .config import BudgetUnit, ErrorCurrency, Propagate
from .cost import CostModel
from .devices import resolve_device
from .errors import ShrinkError, first_line
from .evaluation import glue_hub
from .evaluation.suite import check_suite, evaluate_suite
from .identity import differences, identity, plain
from .lock import locked
from .mapped import check_block_map, check_device_map
from .methods import METHODS, Method, build_method, check_method
from .models import Adapter, load_config, skeleton
from .models.streaming import check_streamable
from .outputs import RunFolder, read_metrics, remove_if_empty, write_failed
from .progress import Progress
from .provenance import provenance
from .runner import Runner
from .schedules import NEEDS_PROFILES, check_schedule, make_plan
from .store import BlockStore, open_store
from .summary import summary
from .tracking import Tracker, check_logger, make_tracker

log = logging.getLogger("shrink")


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


def validate(cfg: DictConfig) -> None:
    """Every check that needs no weights, so bad input fails before expensive work."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. model=bert-glue without eval=glue-hub
        raise ShrinkError(f"the config does not resolve: {first_line(err)}") from None
    check_known_keys(cfg)
    if not 0.0 < float(cfg.budget) <= 1.0:
        raise ShrinkError(f"budget {cfg.budget} is outside (0, 1]: it is the fraction of block weights kept")
    check_method(cfg.method.name)
    steps.check(cfg, METHODS[cfg.method.name].factorises)
    METHODS[cfg.method.name].check(cfg.method, int(cfg.calib.batch_size), Propagate(cfg.propagate).value)
    check_schedule(cfg.schedule.name)
    if cfg.schedule.name in NEEDS_PROFILES and not METHODS[cfg.method.name].has_profile:
        with_profiles = sorted(n for n, m in METHODS.items() if m.has_profile)
        raise ShrinkError(
            f"schedule {cfg.schedule.name!r} allocates by the method's error profile, which method "
            f"{cfg.method.name!r} does not provide; methods that do: {', '.join(with_profiles)}"
        )
    error = _error_currency(cfg)
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
    # a budget the corrections exceed, or (without profiles) the schedule cannot meet, fails here
    planned = plan_inputs(cfg, cost_model(cfg, blocks), build_method(cfg.method).prunes_heads)
    if cfg.schedule.name not in NEEDS_PROFILES:
        make_plan(cfg.schedule.name, planned)
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


def plan_inputs(cfg: DictConfig, costs: CostModel, prunes_heads: bool) -> PlanInputs:
    """What the schedule plans from: the budget in its unit, and the schedule's own keys."""
    return PlanInputs(
        costs.table(),
        costs.plan_budget(float(cfg.budget)),
        prunes_heads,
        None,
        float(cfg.schedule.get("min_keep", 0.0)),
        int(cfg.schedule.get("k", 0)),
        _error_currency(cfg),
    )


def _error_currency(cfg: DictConfig) -> ErrorCurrency:
    """greedy's `error` key; schedules without one compare errors per unit."""
    return ErrorCurrency(cfg.schedule.get("error", ErrorCurrency.unit.value))


def cost_model(cfg: DictConfig, adapter: Adapter) -> CostModel:
    """Prices in the budget unit; attention scores count at `budget_seq_len` (at most the context)."""
    seq_len = min(int(cfg.budget_seq_len), adapter.max_positions() or int(cfg.budget_seq_len))
    dtype_bytes = next(adapter.model.parameters()).element_size()
    weight_bytes = steps.stored_bits(cfg.quant, dtype_bytes * 8) / 8
    rank = int(cfg.quant.lowrank) if cfg.quant.name != "none" else 0
    return CostModel(adapter, BudgetUnit(cfg.budget_unit), seq_len, weight_bytes, dtype_bytes, rank)


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
    if cfg.model.source == "tiny":
        raise ShrinkError(
            "model.device_map places weights read from files; a tiny random model has none: save it "
            "and use model.source=local"
        )
    if cfg.stream:
        raise ShrinkError("model.device_map and stream=true exclude each other: pick one way to place blocks")


def _run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _run_name_and_group(cfg: DictConfig) -> tuple[str, str | None]:
    """W&B run name from the job's overrides; in a sweep, the group is the sweep folder's name
    unless `logger.group` sets one."""
    name = f"{cfg.model.name}-{cfg.method.name}-{cfg.schedule.name}-b{cfg.budget}"
    group = cfg.logger.get("group")
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        name = hydra_cfg.job.override_dirname or name
        if group is None and hydra_cfg.mode == RunMode.MULTIRUN:
            group = Path(hydra_cfg.sweep.dir).name
    except ValueError:  # not under Hydra (tests, the Python API)
        pass
    return name, group


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float | None:
    """Run one job; returns the objective (compressed perplexity on the first eval corpus). The
    run folder is locked for the whole run: a second process there fails at once, writing nothing."""
    folder = RunFolder(_run_dir(run_dir))
    with locked(folder.path):
        return _run(cfg, folder)


def _run(cfg: DictConfig, folder: RunFolder) -> float | None:
    try:
        validate(cfg)
        previous = finished_run(folder.path, cfg) if cfg.resume else None
        if previous is not None:
            print(f"shrink: {folder.path} has finished already with this config (resume=true): skipped")
            return _objective(previous)
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
    dtype = getattr(torch, str(getattr(cfg.dtype, "value", cfg.dtype)))
    folder.start(cfg)
    tracker = make_tracker(cfg.logger)
    try:
        tracker.start(folder.path, OmegaConf.to_container(cfg, resolve=True), *_run_name_and_group(cfg))
        with open_store(cfg, folder.path, device, dtype, progress) as store:
            clock["loaded"] = time.perf_counter()
            metrics = _compress_and_evaluate(cfg, store, Job(folder, tracker, progress, done, clock))
        for plot in folder.finish(metrics):
            tracker.log_image(plot.stem, plot)
        tracker.log_metrics(metrics)
        tracker.finish("ok")
        progress.clear()
    except BaseException as err:
        tracker.finish("failed")
        write_failed(folder.path, cfg, err)
        raise
    print(summary(metrics, folder.path))
    if cfg.push_to_hub is not None:
        print(f"  pushed     {hub.push(folder.path / 'model', cfg.push_to_hub)}")
    return _objective(metrics)


@dataclasses.dataclass
class Job:
    """What the stages of one run share besides the config and the store."""

    folder: RunFolder
    tracker: Tracker
    progress: Progress
    done: int  # last block finished by an earlier attempt (resume), -1 for none
    clock: dict[str, float]  # perf_counter at each stage boundary


def _compress_and_evaluate(cfg: DictConfig, store: BlockStore, job: Job) -> dict[str, Any]:
    """Dense scores → compression → checks and checkpoint → compressed scores; returns metrics."""
    device = store.device
    method = build_method(cfg.method)
    method.width_multiple = steps.width_multiple(cfg)
    method.check_model(store.adapter)
    costs = cost_model(cfg, store.adapter)
    inputs = plan_inputs(cfg, costs, method.prunes_heads)
    params_dense, dense_cost = _params(store.model), costs.model()
    results: dict[str, Any] = {}
    evaluate_suite(cfg, store, False, results, job.folder.path)
    job.clock["dense_eval"] = time.perf_counter()
    _compress(cfg, store, method, costs, inputs, job)
    job.clock["compressed"] = time.perf_counter()
    stored = store.end_compression()  # where the compressed blocks are read from for saving
    kept_cost = costs.model()
    unit = inputs.unit
    achieved = kept_cost.of(unit) / dense_cost.of(unit)
    if achieved > float(cfg.budget) + 1e-9:
        raise RuntimeError(f"achieved budget {achieved:.6f} exceeds the requested {cfg.budget} (a bug)")
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
        "resumed_after_block": job.done if job.done >= 0 else None,
        "load_seconds": clock["loaded"] - clock["start"],
        "eval_seconds": (clock["dense_eval"] - clock["loaded"]) + (clock["end"] - clock["saved"]),
        "total_seconds": clock["end"] - clock["start"],
        "peak_rss_mb": rss.peak_mb(),
        "checkpoint_mb": _folder_mb(job.folder.path / "model") if cfg.save_model else None,
        **steps.summary(cfg, store.adapter, stored),
        "seed": cfg.seed,
        "device": device.type,
        "device_map": store.device_summary(),
        "stream": bool(cfg.stream),
        "propagate": Propagate(cfg.propagate).value,
        "calib": {"corpus": cfg.calib.corpus, "nsamples": cfg.calib.nsamples, "seq_len": cfg.calib.seq_len},
        "eval": results,
        "versions": provenance(),
    }


def _compress(
    cfg: DictConfig, store: BlockStore, method: Method, costs: CostModel, inputs: PlanInputs, job: Job
) -> None:
    """Plan (profiling first when the schedule needs it), then compress block by block, each
    finished block recorded (and checkpointed) as it comes; a resumed run starts after job.done."""
    adapter, device = store.adapter, store.device
    windows = data.calibration_windows(
        cfg.calib.corpus, store.tokenizer, cfg.calib.nsamples, cfg.calib.seq_len, cfg.seed, cfg.model.add_bos
    )
    store.begin_compression()
    runner = Runner(
        adapter, windows, cfg.calib.batch_size, device, store.placement, costs,
        method.new_stats,
    )  # fmt: skip
    if cfg.schedule.name in NEEDS_PROFILES:  # the planning pass: the dense model's statistics
        inputs.curves = [
            curve for ctx in runner.blocks(Propagate.dense, desc="profile") for curve in method.profile(ctx)
        ]
    plan = make_plan(cfg.schedule.name, inputs)
    job.folder.add_plan(plan.rows())
    job.tracker.log_plan(plan.rows())

    start_inputs = None
    if job.done >= 0:  # resume: rebuild the finished blocks, feed the next one its saved inputs
        records, hidden, teacher = store.restore(job.progress, job.done)
        for index, (rows, spectra) in enumerate(records):
            job.folder.add_block(index, rows, spectra)
            job.tracker.log_block(index, rows, spectra)
        start_inputs = (hidden, teacher)
        log.info("resuming after block %d of %d", job.done, len(adapter.blocks()))
    post = steps.BlockSteps(cfg.quant, cfg.sparsity)
    teacher = method.needs_teacher or post.needs_teacher
    blocks = runner.blocks(
        Propagate(cfg.propagate), plan, teacher, start=job.done + 1, start_inputs=start_inputs
    )
    with contextlib.closing(blocks):  # on an error or Ctrl-C the walk (and its progress bar) ends here
        for ctx in blocks:
            result = method.compress_block(ctx)
            step_rows = post.apply(ctx) if post.active else []
            hidden, teacher, seconds = runner.advance(ctx)
            rows = [{"block": ctx.index, **row, "block_seconds": seconds} for row in result.records]
            job.folder.add_block(ctx.index, rows, result.spectra)
            job.folder.add_steps([{"block": ctx.index, **row} for row in step_rows])
            job.tracker.log_block(ctx.index, rows, result.spectra)
            if cfg.block_checkpoints:
                job.progress.save_block(
                    ctx.index, store.model, adapter, cfg.model.head, rows, result.spectra, hidden, teacher
                )


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
