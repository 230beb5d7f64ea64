"""One heal: the compressed model trained on the heal corpus and given back with exactly its
compressed structure (LoRA merged into each stored weight)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback

from ..errors import NumericalError
from ..models import Adapter
from . import HEALERS
from .adapters import end_full, merge_lora, train_full, with_lora
from .config import HealParams
from .targets import target_linears
from .teacher_cache import cached_targets, entry_key, teacher_targets, weights_fingerprint
from .trainer import heal_steps, train, use_bf16
from .windows import heal_windows


def heal(
    adapter: Adapter,
    tokenizer: PreTrainedTokenizerBase,
    teacher: Callable[[], nn.Module] | None,
    cfg: DictConfig,
    add_bos: bool,
    device: torch.device,
    checkpoints: Path,
    log_path: Path,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    callbacks: list[TrainerCallback] | None = None,
    teacher_identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Heal `adapter.model` in place on `device`; returns what metrics.json reports. `teacher`
    loads the dense model when a healer needs it (not at all when its cached targets are found);
    `teacher_identity` names it for that cache (None: a fingerprint of its weights). `checkpoints`
    holds Trainer's resumable checkpoints (a resumed heal goes on from the last); `callbacks` are
    more TrainerCallbacks (e.g. scoring held-out text as the tokens grow)."""
    model = adapter.model
    healer = HEALERS[cfg.name](cfg)
    if healer.needs_teacher and teacher is None:
        raise ValueError(f"heal={cfg.name} needs the dense model: give `teacher` a loader")
    linears = target_linears(adapter, list(cfg.targets))
    steps, _ = heal_steps(cfg)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "params": HealParams(cfg.params).value,
        "corpus": str(cfg.corpus),
        "targets": len(linears),
    }
    if steps == 0:  # nothing to train: the model is left as it is
        return summary | {"steps": 0, "tokens": 0}
    windows = heal_windows(
        str(cfg.corpus), tokenizer, int(cfg.tokens), int(cfg.seq_len), int(cfg.seed), add_bos
    )
    dense, extra = None, None
    if healer.needs_teacher and cfg.get("cache_teacher"):
        started = time.perf_counter()
        extra, hit = _cached_targets(cfg, teacher, teacher_identity, windows, device)
        seconds = time.perf_counter() - started
        summary |= {"teacher_cache": "hit" if hit else "built", "teacher_seconds": seconds}
    elif healer.needs_teacher:
        dense = teacher()
    count = sum(p.numel() for p in model.parameters())
    training, config = model.training, model.config.to_dict()
    torch.manual_seed(int(cfg.seed))  # LoRA's A starts random
    where = (cfg, device, checkpoints, log_path, log, callbacks, extra)
    if HealParams(cfg.params) == HealParams.lora:
        wrapped = with_lora(model, linears, int(cfg.rank), float(cfg.alpha), float(cfg.dropout))
        summary["trainable"] = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        summary |= train(wrapped, healer, dense, windows, *where)
        merged = merge_lora(wrapped, linears)
        if merged is not model:
            raise RuntimeError("peft gave back another model than it wrapped (a bug)")
    else:
        handles = train_full(model, linears)
        summary["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        try:
            summary |= train(model, healer, dense, windows, *where)
        finally:
            end_full(model, linears, handles)
    model.train(training)
    for key, value in config.items():  # Trainer switches the cache off and names architectures
        if getattr(model.config, key, None) != value:
            setattr(model.config, key, value)
    if sum(p.numel() for p in model.parameters()) != count:
        raise RuntimeError("heal changed the model's parameter count (a bug)")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NumericalError(f"heal={cfg.name} left non-finite weights: lower heal.lr (now {cfg.lr})")
    return summary


def _cached_targets(
    cfg: DictConfig,
    teacher: Callable[[], nn.Module],
    identity: dict[str, Any] | None,
    windows: torch.Tensor,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], bool]:
    """The teacher's targets of `windows` from the cache, the teacher loaded only to fill it (or to
    fingerprint a teacher nothing else names)."""
    loaded = None
    if identity is None:
        loaded = teacher()
        identity = {"weights": weights_fingerprint(loaded), "dtype": str(next(loaded.parameters()).dtype)}
    bf16 = use_bf16(cfg, device)
    temperature, top = float(cfg.temperature), int(cfg.cache_top)
    key = entry_key(identity | {"device": device.type}, windows, temperature, top, bf16)
    return cached_targets(
        key,
        lambda: teacher_targets(
            loaded if loaded is not None else teacher(), windows, temperature, top, device, bf16
        ),
    )
