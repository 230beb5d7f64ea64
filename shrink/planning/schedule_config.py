"""The keys of each schedule (`conf/schedule/`), registered with it in `schedules.py`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ErrorCurrency, ScheduleConf


@dataclass
class UniformConf(ScheduleConf):
    name: str = "uniform"


@dataclass
class GreedyConf(ScheduleConf):
    name: str = "greedy"
    # no unit keeps less than this share of its dense cost (guards units whose calibration energy
    # is dominated by a few outlier tokens; see README, schedules)
    min_keep: float = 0.3
    error: ErrorCurrency = ErrorCurrency.unit  # see README, schedules


@dataclass
class SearchConf(GreedyConf):
    """`greedy`'s plan (its `min_keep`, its `error`), then a search scored on the model."""

    name: str = "search"
    error: ErrorCurrency = ErrorCurrency.residual  # the seed is greedy-residual's plan
    evaluations: int = 48  # plans scored on the model (the seed's included)
    offspring: int = 4  # children per generation
    moves: int = 2  # at most this many pair moves per child
    step: float = 0.05  # one rung of a unit's ladder: this share of its dense cost
    reach: int = 3  # rungs each way from the seed's option
    windows: int = 8  # held-aside calibration windows (of calib.seq_len tokens) the fitness reads


@dataclass
class LastKConf(ScheduleConf):
    name: str = "last_k"
    k: int = 10  # compress only the last k blocks


@dataclass
class FirstKConf(ScheduleConf):
    name: str = "first_k"
    k: int = 10  # compress only the first k blocks


@dataclass
class SpanConf(ScheduleConf):
    name: str = "span"
    dense_first: int = 0  # the first blocks that stay dense
    dense_last: int = 0  # the last blocks that stay dense


@dataclass
class EnergyConf(ScheduleConf):
    name: str = "energy"


@dataclass
class ThresholdConf(ScheduleConf):
    name: str = "threshold"
