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
