"""`schedule=search`: the plan a search finds on the model itself, seeded with `greedy`'s.

1. The seed and the space: `greedy`'s choice on the method's profiles, and per unit a ladder of
   options a few cost steps around it (`planning.search.local_options`).
2. Candidates: one more dense pass over the calibration windows, in which every block's units are
   compressed once per option of their ladders (`blocks.candidates`).
3. Fitness of a plan: the mean KL divergence of the model's next-token distributions to the
   dense model's on held-aside calibration windows, the model assembled from the candidates
   (only the blocks whose choice changed are rebuilt).
4. `planning.search.evolve` finds the plan; the run then compresses with it as with any plan.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig

from ..blocks.candidates import assemble, prepare
from ..blocks.runner import Runner
from ..config import Propagate
from ..data import corpora as data
from ..errors import NumericalError
from ..heal.losses.distill import kl_loss
from ..planning.budget import Plan, PlanInputs
from ..planning.schedules import plan_from_choice, search_seed
from ..planning.search import evolve, local_options
from .store import BlockStore

log = logging.getLogger(__name__)


def kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_dense ‖ p) (heal's `kl` at temperature 1), checked finite."""
    value = float(kl_loss(logits, reference))
    if not math.isfinite(value):
        raise NumericalError("schedule=search: a candidate plan gave non-finite logits")
    return value


def searched_plan(
    cfg: DictConfig,
    store: BlockStore,
    runner: Runner,
    method: Any,
    inputs: PlanInputs,
    teacher: bool = False,
) -> tuple[Plan, dict[str, Any]]:
    """The searched plan and what the search did (for metrics.json). The store is ready for
    compression again when it returns."""
    started = time.perf_counter()
    adapter = store.adapter
    windows = data.held_aside_windows(
        cfg.calib.corpus, store.tokenizer, int(cfg.schedule.windows), cfg.calib.seq_len,
        cfg.calib.nsamples, cfg.seed, cfg.model.add_bos,
    )  # fmt: skip
    conf = cfg.schedule
    profiles, seed = search_seed(inputs)
    dense_costs = [c.dense_cost for c in profiles.curves]
    ladders = local_options(profiles.costs, seed, dense_costs, float(conf.step), int(conf.reach))
    by_block: dict[int, list[int]] = {}
    for u, curve in enumerate(profiles.curves):
        by_block.setdefault(curve.block, []).append(u)

    edits: dict[int, dict] = {}  # unit -> option -> its edit
    for ctx in runner.blocks(Propagate.dense, teacher=teacher, desc="candidates"):
        units = by_block.get(ctx.index, [])
        prepared = prepare(ctx, adapter, method, [(profiles.curves[u], ladders[u]) for u in units])
        edits.update(zip(units, prepared, strict=True))
    prepared_s = time.perf_counter() - started

    store.ready_for_evaluation()
    blocks = adapter.blocks()
    dense_blocks = list(blocks)
    built = {b: tuple(-1 for _ in units) for b, units in by_block.items()}  # every block dense so far
    windows = windows.to(store.device)

    def forward(window: torch.Tensor) -> torch.Tensor:
        """One window at a time: a batch's logits are tokens × vocabulary floats."""
        with torch.no_grad():
            return adapter.forward(window[None]).logits[0]

    def fitness(choice: list[int]) -> float:
        for b, units in by_block.items():
            key = tuple(choice[u] for u in units)
            if built[b] == key:
                continue
            parts = [edits[u][choice[u]] for u in units]
            blocks[b] = assemble(dense_blocks[b], adapter, parts) if any(parts) else dense_blocks[b]
            built[b] = key
        return sum(kl_to(ref, forward(w)) for ref, w in zip(reference, windows, strict=True)) / len(windows)

    try:
        reference = [forward(w) for w in windows]
        result = evolve(
            profiles.costs,
            profiles.allowance,
            ladders,
            seed,
            fitness,
            int(conf.evaluations),
            int(conf.offspring),
            int(conf.moves),
            int(cfg.seed),
        )
    finally:
        for b, block in enumerate(dense_blocks):
            blocks[b] = block
        store.begin_compression()
    moved = sum(a != b for a, b in zip(result.choice, seed, strict=True))
    log.info(
        "search: KL %.5f -> %.5f on %d held-aside windows, %d plans scored, %d of %d units moved",
        result.seed_fitness, result.fitness, len(windows), result.evaluations, moved, len(seed),
    )  # fmt: skip
    summary = {
        "seed_kl": result.seed_fitness,
        "kl": result.fitness,
        "evaluations": result.evaluations,
        "units_moved": moved,
        "history": result.history,
        "prepare_seconds": prepared_s,
        "seconds": time.perf_counter() - started,
    }
    return plan_from_choice(inputs, profiles, result.choice), summary
