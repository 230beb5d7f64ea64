"""The Python API: `compress` and `evaluate` from a notebook or a script, with the CLI's config.

Both compose the same Hydra config as `python launch.py` (the files of `conf/`, their defaults and
every check), from keyword arguments plus `overrides` in the CLI's syntax, so a call and a command
with the same settings give the same numbers:

    import shrink
    result = shrink.compress("smollm2-135m", method="id", budget=0.5, overrides=["eval=ppl"])
    result.metrics["eval"]["ppl"]["wiki"]          # {"dense": …, "compressed": …}
    result.save("smollm2-id-0.5")                   # the folder a run writes: model/, metrics.json, …

A model already in memory is handed over with its tokenizer and compressed in place.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .checkpoints.save_load import find_checkpoint, load, load_tokenizer
from .data.corpora import given_texts
from .errors import ShrinkError
from .models.catalog import shipped
from .models.loading import handed_over, load_model
from .run.pipeline import run_job
from .run.plugins import compose_config
from .run.validation import validate


@dataclass
class Compressed:
    """A finished compression: the model in memory, its tokenizer, the run's metrics, and the run
    folder they were written to (a temporary one unless `folder=` was given)."""

    model: nn.Module
    tokenizer: Any
    metrics: dict[str, Any]
    folder: Path
    config: DictConfig = field(repr=False)

    def save(self, folder: str | Path) -> Path:
        """Write the run's folder (`model/` checkpoint, `metrics.json`, `config.yaml`, tables) to
        `folder`, which must not exist yet; returns it."""
        target = Path(folder)
        if target.exists():
            raise ShrinkError(f"{target} exists already; save into a new folder")
        shutil.copytree(self.folder, target)
        return target


def compress(
    model: str | Path | nn.Module,
    *,
    tokenizer: Any = None,
    method: str = "id",
    budget: float = 0.5,
    calibration: str | Sequence[str] | None = None,
    overrides: Iterable[str] = (),
    folder: str | Path | None = None,
) -> Compressed:
    """Compress `model` with `method` to `budget` (the fraction of block weights kept).

    `model`: a name of `conf/model/` (`"smollm2-135m"`), a local model folder or .gguf file, or a
    transformers model already loaded (then `tokenizer` too; it is compressed in place, on the
    CPU). `calibration`: a corpus name (`"wiki"`, `"c4-sample"`, …) or a list of texts to
    calibrate on. `overrides`: anything else, in the CLI's syntax (`"schedule=uniform"`,
    `"eval=none"`, `"quant=gptq"`). `folder`: where the run folder is written (default: a fresh
    temporary folder; `Compressed.save` copies it)."""
    with ExitStack() as stack:
        arguments = _model_overrides(model, tokenizer, stack)
        arguments += [f"method={method}", f"budget={budget}"]
        if calibration is not None:
            arguments.append(f"calib.corpus={_corpus(calibration)}")
        cfg = compose_config(*arguments, *overrides)
        run_dir = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="shrink-run-"))
        finished = run_job(cfg, run_dir)
        result = finished.model
        if result is None:  # streamed or skipped (resume=true): read back what the run saved
            from .checkpoints.save_load import load, load_tokenizer

            result, tokenizer = load(run_dir / "model"), load_tokenizer(run_dir / "model")
        else:
            tokenizer = finished.tokenizer
        return Compressed(result, tokenizer, finished.metrics, run_dir, cfg)


def evaluate(
    model: str | Path | nn.Module,
    tokenizer: Any = None,
    *,
    suite: str = "ppl",
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """Score `model` (a config name, a folder, a run folder or shrink checkpoint, or a loaded model
    with its tokenizer) with the evaluation suite `suite` of `conf/eval/` (`ppl`, `quick`,
    `zeroshot`, `speed`, `glue`, …); returns the scores as a run's `metrics.json` files them under
    `eval`, each under `score` instead of `dense` and `compressed`
    (`{"ppl": {"wiki": {"score": 17.9, "tokens": …}}}`)."""
    from .evaluation.suite import evaluate_suite
    from .hardware.devices import resolve_device
    from .run.store import ResidentStore

    saved = None if isinstance(model, nn.Module) else find_checkpoint(Path(str(model)).expanduser())
    if saved is not None:  # its own loader builds it: its structure is the checkpoint's, not a config's
        model, tokenizer = load(saved), load_tokenizer(saved)
    with ExitStack() as stack:
        arguments = _model_overrides(model, tokenizer, stack)
        cfg = compose_config(*arguments, f"eval={suite}", "eval.cache_dense=false", *overrides)
        validate(cfg, ([], False))
        torch.manual_seed(cfg.seed)
        device = resolve_device(cfg.device)
        dtype = getattr(torch, str(getattr(cfg.dtype, "value", cfg.dtype)))
        loaded = load_model(cfg.model, dtype, seed=cfg.seed)
        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="shrink-eval-") as scratch:
            evaluate_suite(cfg, ResidentStore(loaded, device), False, results, Path(scratch))
    return _scores(results)


def _model_overrides(model: str | Path | nn.Module, tokenizer: Any, stack: ExitStack) -> list[str]:
    """The `model=…` overrides that name `model`; a loaded model is handed over for the call."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ShrinkError("a loaded model needs its tokenizer: shrink.compress(model, tokenizer=…)")
        key = stack.enter_context(handed_over(model, tokenizer))
        name = Path(str(getattr(model.config, "name_or_path", "") or "model")).name or "model"
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return [
            "model=local",
            "model.source=memory",
            f"model.path={key}",
            f"model.name={name}",
            f"dtype={dtype}",
        ]
    text = str(model)
    if text in shipped():
        return [f"model={text}"]
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ["model=gguf", f"model.path={path.resolve()}"]
    if path.is_dir():
        return ["model=local", f"model.path={path.resolve()}"]
    raise ShrinkError(
        f"model {text!r} is neither a model config ({', '.join(sorted(shipped()))}), a local folder "
        "or .gguf file, nor a loaded transformers model"
    )


def _corpus(calibration: str | Sequence[str]) -> str:
    if isinstance(calibration, str):
        return calibration
    texts = list(calibration)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ShrinkError("calibration must be a corpus name or a non-empty list of texts")
    return given_texts(texts)


def _scores(results: Any) -> Any:
    """A run files each score under `dense` and `compressed`; one model has one: `score`."""
    if isinstance(results, dict):
        return {("score" if k == "dense" else k): _scores(v) for k, v in results.items()}
    return results


__all__ = ["Compressed", "compose_config", "compress", "evaluate"]
