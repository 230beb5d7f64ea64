"""The method interface: edit one block in place, given its statistics and targets."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from omegaconf import DictConfig

from ..blocks.context import BlockContext, BlockResult
from ..errors import ShrinkError
from ..linalg.moments import SecondMoment
from ..models import Adapter, Site
from ..planning.budget import Curve, PlanInputs, Sizes


class Method(ABC):
    """A compression method. Registered by the name of its config file (`conf/method/<name>.yaml`)."""

    name: str = ""
    has_profile: bool = False  # implements `profile`, so error-driven schedules (greedy) can plan it
    # its profile's units write into the residual stream and report their energies (Curve.energy),
    # so greedy can compare them with schedule.error=residual|downstream
    residual_units: bool = False
    scores_units: bool = False  # its profile's options carry unit scores, for schedule=threshold
    # it may remove whole blocks (BlockContext.removed), chosen across the model by a planning pass
    removes_blocks: bool = False
    needs_teacher: bool = False  # the runner must give it the dense model's block inputs and outputs
    # it reads the calibration loss's gradient (BlockContext.saliences), from a backward pass over
    # the whole dense model before compression: a resident model, not stream=true
    needs_gradients: bool = False
    factorises: bool = False  # it leaves rank-r factor pairs (LowRankLinear)
    # it rotates and slices the residual stream (SliceGPT): each block reads the stream in the basis
    # the block before it chose, so blocks go in order on the compressed stream, and the method
    # carries that basis from one block to the next
    rotates_stream: bool = False
    # the input widths it leaves (neurons, ranks, value widths) are multiples of this: an N:M
    # sparsity step needs whole spans of M (set by the run from `sparsity.pattern`)
    width_multiple: int = 1

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @staticmethod  # noqa: B027  (an optional hook: most methods have nothing to check)
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        """Value checks of the method's own config keys, run before any model is loaded."""

    def check_model(self, adapter: Adapter) -> None:  # noqa: B027  (optional, as `check`)
        """Checks that need the loaded model's structure (not its statistics), run before any
        evaluation or calibration pass."""

    def new_stats(
        self, site: Site, dim: int, device: torch.device, where: str, seed: int
    ) -> SecondMoment | None:
        """The accumulator of `site`'s input statistics, which the runner streams every calibration
        batch into: the second moment and mean, unless a method needs more (id's sketch check) or
        nothing (None: id reads only the inputs of the layers it folds into)."""
        return SecondMoment(dim, device=device, where=where, seed=seed)

    @abstractmethod
    def compress_block(self, ctx: BlockContext) -> BlockResult:
        """Edit `ctx.block` in place to meet `ctx.targets`; return per-layer rows and spectra."""

    @property
    def prunes_heads(self) -> bool:
        """Whether the method removes attention heads (and so their attention-score MACs)."""
        return False

    # a method key that sets the amount of compression the method's own way (ShortGPT's block
    # count, LLM-Pruner's per-block ratio); when set, the run's budget is what it keeps
    knob: str | None = None

    def native_budget(self, contexts: list[BlockContext], inputs: PlanInputs) -> float | None:
        """The share of the dense cost table that `knob` keeps, priced from shapes alone (`contexts`
        hold no statistics); None while the knob is unset."""
        return None

    def carried(self) -> dict[str, torch.Tensor]:
        """What the method hands from the block just done to the next (SliceGPT's basis of the
        stream): saved with the next block's inputs, so a resumed run continues as it was."""
        return {}

    def carry(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027  (optional, as `check`)
        """Take back what `carried` gave, when a resumed run starts after a finished block."""

    def embedding_basis(self) -> torch.Tensor | None:
        """The basis (d × k) the residual stream starts in once every block is done, which the run
        gives the embeddings (`Adapter.rotate_embeddings`); None: they stay as they are."""
        return None

    def prepare(self, contexts: list[BlockContext], inputs: PlanInputs) -> None:  # noqa: B027
        """A choice for the whole model made from its shapes before the first block (`contexts`
        hold no statistics), such as SliceGPT's one stream width; raises if the budget is out of
        reach. Runs in the checks before loading, and again on the loaded model."""

    def sizes(self, ctx: BlockContext) -> list[Sizes] | None:
        """The sizes each unit of the block may take, priced from the block's shapes alone (`ctx`
        has no statistics): what validation checks a budget against before anything loads. None:
        the method does not say, and its budget is checked as it compresses."""
        return None

    def profile(self, ctx: BlockContext) -> list[Curve]:
        """Error-vs-cost options of each unit of the block, from its statistics; edits nothing."""
        raise ShrinkError(f"method {self.name!r} has no error profile, so it cannot run schedule 'greedy'")
