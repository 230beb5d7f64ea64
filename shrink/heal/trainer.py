"""The heal loop is transformers' Trainer: mixed precision, gradient accumulation, resumable
checkpoints and multi-GPU launch (`accelerate launch`, DDP/FSDP) come from it. shrink gives it the
loss, the windows, a progress bar with tokens/s and a log of each step (`heal.jsonl`, the
tracker)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .base import Healer
from .config import HealDType
from .teacher_cache import place_teacher


class Windows(torch.utils.data.Dataset):
    """The heal windows, each with its rows of `extra` (e.g. a cached teacher's targets)."""

    def __init__(self, windows: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> None:
        self.windows, self.extra = windows, extra or {}

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]} | {k: v[index] for k, v in self.extra.items()}


class HealTrainer(Trainer):
    """Trainer whose loss is the healer's (a mean per micro-batch: every micro-batch holds the
    same number of tokens, so Trainer's division by the accumulation steps gives the step's mean)."""

    def __init__(self, *args: Any, healer: Healer, teacher: nn.Module | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.healer, self.teacher = healer, teacher
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        loss = self.healer.loss(model, inputs, self.teacher)
        return (loss, None) if return_outputs else loss


class StepLog(TrainerCallback):
    """Each logged step as a row of `heal.jsonl` and to the tracker."""

    def __init__(self, path: Path, tokens_per_step: int, log: Callable[[dict[str, Any]], None]) -> None:
        self.path, self.tokens_per_step, self.log = path, tokens_per_step, log

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "tokens": state.global_step * self.tokens_per_step, **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.log(row)


class TokenProgress(ProgressCallback):
    """Trainer's bar, with tokens per second and the loss, and without printing every log."""

    def __init__(self, tokens_per_step: int) -> None:
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.started, self.first, self.loss = 0.0, 0, float("nan")

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        super().on_train_begin(args, state, control, **kwargs)
        self.started, self.first = time.perf_counter(), state.global_step
        if self.training_bar is not None:
            self.training_bar.set_description("heal")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            rate = (
                (state.global_step - self.first) * self.tokens_per_step / (time.perf_counter() - self.started)
            )
            known = self.loss == self.loss  # NaN until the first logged step
            self.training_bar.set_postfix(
                {"tokens_s": f"{rate:.0f}"} | ({"loss": f"{self.loss:.4f}"} if known else {})
            )

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        self.loss = (logs or {}).get("loss", self.loss)


def heal_steps(cfg: DictConfig) -> tuple[int, int]:
    """(optimizer steps, tokens per step) of a heal config."""
    per_step = int(cfg.batch) * int(cfg.grad_accum) * int(cfg.seq_len)
    return math.ceil(int(cfg.tokens) / per_step), per_step


def use_bf16(cfg: DictConfig, device: torch.device) -> bool:
    dtype = HealDType(cfg.dtype)
    return dtype == HealDType.bfloat16 or (dtype == HealDType.auto and device.type != "cpu")


def train(
    model: nn.Module,
    healer: Healer,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    cfg: DictConfig,
    device: torch.device,
    checkpoints: Path,
    log_path: Path,
    log: Callable[[dict[str, Any]], None],
    callbacks: list[TrainerCallback] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train `model` (its trainable parameters) on `windows` (with their rows of `extra`); goes on
    from the last checkpoint in `checkpoints` when there is one (bit-exact: Trainer restores
    weights, optimizer, schedule, random states and the place in the data). Returns a summary."""
    steps, per_step = heal_steps(cfg)
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    done = int(Path(resume).name.split("-")[-1]) if resume else 0
    _keep_rows(log_path, done)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=steps,
        per_device_train_batch_size=int(cfg.batch),
        gradient_accumulation_steps=int(cfg.grad_accum),
        learning_rate=float(cfg.lr),
        lr_scheduler_type=str(cfg.schedule),
        warmup_steps=math.ceil(steps * float(cfg.warmup)),
        weight_decay=float(cfg.weight_decay),
        max_grad_norm=float(cfg.max_grad_norm),
        logging_steps=int(cfg.log_every),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=int(cfg.save_every) or steps,
        save_total_limit=1,
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        bf16=use_bf16(cfg, device),
        use_cpu=device.type == "cpu",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = HealTrainer(
        model=model, args=args, train_dataset=Windows(windows, extra), healer=healer, teacher=teacher,
        callbacks=[StepLog(log_path, per_step, log), *(callbacks or [])],
    )  # fmt: skip
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TokenProgress(per_step))
    if teacher is not None:
        place_teacher(teacher, args.device)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    losses = [row["loss"] for row in _rows(log_path)]
    return {
        "steps": steps,
        "tokens": steps * per_step,
        "tokens_per_step": per_step,
        "resumed_at_step": done or None,
        "seconds": seconds,
        "tokens_per_second": (steps - done) * per_step / seconds if seconds > 0 else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "bf16": args.bf16,
    }


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_rows(path: Path, upto: int) -> None:
    """A resumed heal logs its steps again from its checkpoint on: drop the rows after it."""
    rows = [row for row in _rows(path) if row["step"] <= upto]
    if path.exists():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def clear(checkpoints: Path) -> None:
    shutil.rmtree(checkpoints, ignore_errors=True)
