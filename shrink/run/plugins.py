"""Every plug-in registered before Hydra composes a config: their schemas are what the files of
`conf/method/`, `conf/schedule/`, `conf/quant/`, `conf/sparsity/` and `conf/heal/` extend."""

from __future__ import annotations

from ..heal import HEALERS
from ..methods import METHODS
from ..planning.schedules import SCHEDULES
from ..quantization import QUANTIZERS
from ..sparsity import SPARSIFIERS

REGISTRIES = (METHODS, SCHEDULES, QUANTIZERS, SPARSIFIERS, HEALERS)


def load_plugins() -> None:
    for registry in REGISTRIES:
        registry.load()
