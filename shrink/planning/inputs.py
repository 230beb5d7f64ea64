"""What a run plans with: the cost model its budget unit and quantization imply, and the
schedule's inputs (shared by the checks before loading and by the run itself)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import BudgetUnit, ErrorCurrency
from ..models import Adapter
from ..quantization.config import stored_bits
from .budget import PlanInputs
from .cost import CostModel


def plan_inputs(cfg: DictConfig, costs: CostModel, prunes_heads: bool) -> PlanInputs:
    """What the schedule plans from: the budget in its unit, and the schedule's own keys."""
    return PlanInputs(
        costs.table(),
        costs.plan_budget(float(cfg.budget)),
        prunes_heads,
        None,
        float(cfg.schedule.get("min_keep", 0.0)),
        int(cfg.schedule.get("k", 0)),
        (int(cfg.schedule.get("dense_first", 0)), int(cfg.schedule.get("dense_last", 0))),
        error_currency(cfg),
        str(cfg.schedule.name),
    )


def error_currency(cfg: DictConfig) -> ErrorCurrency:
    """greedy's `error` key; schedules without one compare errors per unit."""
    return ErrorCurrency(cfg.schedule.get("error", ErrorCurrency.unit.value))


def cost_model(cfg: DictConfig, adapter: Adapter) -> CostModel:
    """Prices in the budget unit; attention scores count at `budget_seq_len` (at most the context)."""
    seq_len = min(int(cfg.budget_seq_len), adapter.max_positions() or int(cfg.budget_seq_len))
    dtype_bytes = next(adapter.model.parameters()).element_size()
    weight_bytes = stored_bits(cfg.quant, dtype_bytes * 8) / 8
    rank = int(cfg.quant.lowrank) if cfg.quant.name != "none" else 0
    return CostModel(adapter, BudgetUnit(cfg.budget_unit), seq_len, weight_bytes, dtype_bytes, rank)
