"""The keys of the heal step (`conf/heal/`): one schema for every healer, `kd` adds its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from ..config import StepConf


class HealParams(str, Enum):
    lora = "lora"  # low-rank adapters on the target linears (peft), merged in at the end
    full = "full"  # the target linears' own weights and biases


class HealDType(str, Enum):
    auto = "auto"  # bfloat16 autocast on an accelerator, float32 on a CPU
    float32 = "float32"
    bfloat16 = "bfloat16"  # autocast; the weights stay in the model's dtype


@dataclass
class HealConf(StepConf):
    """Recovery training after compression: the compressed model is trained end to end on a
    corpus's calibration part (never test text) and keeps exactly its compressed structure."""

    name: str = MISSING
    # training tokens; steps = tokens / (batch · grad_accum · seq_len), rounded up. The default is
    # what the default `kd` heals of SmolLM2 in about 12 minutes on two AVX2 cores (docs/heal.md)
    tokens: int = 73728
    seq_len: int = 512
    batch: int = 1  # windows per micro-batch (more optimizer steps per token measured better)
    grad_accum: int = 1
    lr: float = 2e-3  # the LoRA adapters' (conf/heal/kd.yaml sets 3e-4 for the weights themselves)
    schedule: str = "cosine"  # transformers' lr_scheduler_type: constant, linear, cosine, …
    warmup: float = 0.05  # share of the steps warming the learning rate up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    params: HealParams = HealParams.lora
    rank: int = 16  # LoRA
    alpha: float = 32.0
    dropout: float = 0.0
    # leaf names of the block linears trained (q_proj, down_proj, fc1, …); [all]: every one
    targets: list[str] = field(default_factory=lambda: ["all"])
    corpus: str = "wiki+c4-sample"  # a shrink corpus; its calibration part is read
    seed: int = 0
    dtype: HealDType = HealDType.auto
    save_every: int = 25  # optimizer steps between resumable checkpoints (0: only the last)
    log_every: int = 1  # optimizer steps between rows of heal.jsonl


@dataclass
class KdConf(HealConf):
    """Distillation from the dense model: KL(teacher ‖ student) of the next-token distributions."""

    temperature: float = 1.0
    hidden: float = 0.0  # weight of the last hidden state's normalised squared error (0: logits only)
    # the teacher's targets from an on-disk cache (heal/teacher_cache.py), built on the first run:
    # its `cache_top` likeliest tokens per position and one bin for the rest
    cache_teacher: bool = False
    cache_top: int = 256
