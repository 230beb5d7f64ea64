"""Every plug-in registered before Hydra composes a config: their schemas are what the files of
`conf/method/`, `conf/schedule/`, `conf/quant/`, `conf/sparsity/` and `conf/heal/` extend."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ..config import CONF
from ..heal import HEALERS
from ..methods import METHODS
from ..planning.schedules import SCHEDULES
from ..quantization import QUANTIZERS
from ..sparsity import SPARSIFIERS

REGISTRIES = (METHODS, SCHEDULES, QUANTIZERS, SPARSIFIERS, HEALERS)


def load_plugins() -> None:
    for registry in REGISTRIES:
        registry.load()


def compose_config(*overrides: str) -> DictConfig:
    """The run config `python launch.py <overrides>` would compose (plug-ins loaded first)."""
    load_plugins()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))
