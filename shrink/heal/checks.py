"""Every check of the heal config that needs no weights: a bad value fails with one line before
anything loads."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf
from transformers import SchedulerType

from ..config import Head, named_keys
from ..data import corpora
from ..errors import ShrinkError
from ..models import Adapter
from . import HEALERS
from .config import HealConf, HealParams
from .targets import ALL, target_names
from .teacher_cache import check_top


def check(cfg: DictConfig, overrides: list[str], multirun: bool) -> None:
    """The heal group against the run: its name, its values, and what it cannot run beside."""
    heal = cfg.heal
    HEALERS.check(heal.name)
    named = named_keys(overrides)
    if heal.name == "none":
        keys = sorted({k for k in named if k.startswith("heal.")} | _changed(heal))
        if keys and not (multirun and "heal" in named):
            shown = " ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in keys)
            raise ShrinkError(
                f"{shown}: heal=none trains nothing, so it changes nothing; choose a healer too "
                f"({' or '.join(f'heal={n}' for n, _ in HEALERS.items())}) or drop it"
            )
        return
    if cfg.stream:
        raise ShrinkError(
            "heal trains the whole compressed model in memory, which stream=true (blocks read from files "
            "one at a time) does not hold: use heal=none with stream=true, or a resident model"
        )
    if Head(cfg.model.head) != Head.causal_lm:
        raise ShrinkError(
            f"heal trains a causal LM's next-token predictions; model {cfg.model.name!r} is not one"
        )
    if cfg.quant.name != "none" and cfg.quant.get("target") == "dense":
        raise ShrinkError(
            "quant.target=dense (GPTAQ) fits each block to the dense model's stream while compressing, but "
            "with heal quantization runs after healing, on the healed model: use quant.target=compressed"
        )
    positive = {
        "tokens": 0,
        "seq_len": 2,
        "batch": 1,
        "grad_accum": 1,
        "rank": 1,
        "log_every": 1,
        "save_every": 0,
    }
    for key, least in positive.items():
        if int(heal[key]) < least:
            raise ShrinkError(f"heal.{key}={heal[key]} must be ≥ {least}")
    for key in ("lr", "alpha"):
        if not float(heal[key]) > 0:
            raise ShrinkError(f"heal.{key}={heal[key]} must be > 0")
    for key in ("warmup", "dropout"):
        if not 0 <= float(heal[key]) < 1:
            raise ShrinkError(f"heal.{key}={heal[key]} must be in [0, 1)")
    if float(heal.weight_decay) < 0 or float(heal.max_grad_norm) < 0:
        raise ShrinkError("heal.weight_decay and heal.max_grad_norm must be ≥ 0")
    schedules = [s.value for s in SchedulerType if s.value != "reduce_lr_on_plateau"]
    if str(heal.schedule) not in schedules:
        raise ShrinkError(
            f"heal.schedule={heal.schedule} is no learning-rate schedule; valid: {', '.join(schedules)}"
        )
    if "temperature" in heal and not float(heal.temperature) > 0:
        raise ShrinkError(f"heal.temperature={heal.temperature} must be > 0")
    if "hidden" in heal and float(heal.hidden) < 0:
        raise ShrinkError(f"heal.hidden={heal.hidden} must be ≥ 0")
    if heal.get("cache_teacher"):
        if int(heal.cache_top) < 1:
            raise ShrinkError(f"heal.cache_top={heal.cache_top} must be ≥ 1")
        if float(heal.hidden) > 0:
            raise ShrinkError(
                f"heal.cache_teacher=true caches the teacher's logits, not its hidden states: drop "
                f"heal.hidden={heal.hidden} or the cache"
            )
    lora_keys = {f"heal.{k}" for k in ("rank", "alpha", "dropout")}
    if HealParams(heal.params) == HealParams.full and (lora_keys & (set(named) | _changed(heal))):
        raise ShrinkError(
            "heal.params=full trains the weights themselves: heal.rank, alpha and dropout are LoRA's"
        )
    corpora.check_corpus(str(heal.corpus))


def check_model(heal: DictConfig, adapter: Adapter) -> None:
    """heal.targets against the model's block linears, and the LoRA rank against their sizes."""
    if heal.name == "none":
        return
    targets, valid = list(heal.targets), target_names(adapter)
    unknown = [t for t in targets if t != ALL and t not in valid]
    if unknown or not targets:
        raise ShrinkError(
            f"heal.targets={targets}: {', '.join(unknown) or 'empty'} is no block linear of this model; "
            f"valid: {ALL}, {', '.join(valid)}"
        )
    if heal.get("cache_teacher"):
        check_top(int(heal.cache_top), int(adapter.model.get_output_embeddings().weight.shape[0]))
    if HealParams(heal.params) != HealParams.lora:
        return
    block = adapter.blocks()[0]
    widths = {
        path.rsplit(".", 1)[-1]: min(
            block.get_submodule(path).in_features, block.get_submodule(path).out_features
        )
        for site in adapter.sites(block)
        for path in site.linears
    }
    narrowest = min((w, n) for n, w in widths.items() if ALL in targets or n in targets)
    if int(heal.rank) > narrowest[0]:
        raise ShrinkError(
            f"heal.rank={heal.rank} is wider than {narrowest[1]} ({narrowest[0]} on its smaller side in "
            "the dense model): lower heal.rank"
        )


def _changed(heal: DictConfig) -> set[str]:
    defaults = HealConf(name="none")
    return {
        f"heal.{f.name}"
        for f in dataclasses.fields(HealConf)
        if f.name != "name" and f.name in heal and heal[f.name] != getattr(defaults, f.name)
    }
