"""What heal trains: the plain linears inside the block linears, by full module name."""

from __future__ import annotations

from torch import nn

from ..errors import ShrinkError
from ..models import Adapter
from ..models.edits import plain_linears

ALL = "all"


def target_linears(adapter: Adapter, targets: list[str]) -> dict[str, nn.Linear]:
    """Full module name → plain linear, for the block linears whose leaf name is in `targets`
    (every one for [all])."""
    found: dict[str, nn.Linear] = {}
    for index, block in enumerate(adapter.blocks()):
        prefix = adapter.block_path(index)
        for site in adapter.sites(block):
            for path in site.linears:
                if ALL not in targets and path.rsplit(".", 1)[-1] not in targets:
                    continue
                for suffix, linear in plain_linears(block.get_submodule(path)):
                    found[f"{prefix}.{path}{suffix}"] = linear
    if not found:
        raise ShrinkError(f"heal.targets={targets} names no block linear of this model")
    return found


def target_names(adapter: Adapter) -> list[str]:
    """The leaf names heal.targets may use."""
    return sorted({path.rsplit(".", 1)[-1] for block in adapter.blocks()[:1] for site in adapter.sites(block)
                   for path in site.linears})  # fmt: skip
