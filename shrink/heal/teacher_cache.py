"""The `kd` teacher's targets cached on disk (`heal.cache_teacher=true`), so that a sweep of methods
and budgets healed on the same windows runs the dense model over them once.

The whole next-token distribution is one float per vocabulary entry and token (SmolLM2: 49152,
about 200 GB per million tokens in float32), so an entry keeps, per position, the `heal.cache_top`
largest logits and their token ids, the log-partition of the tempered logits and the log of the
probability left outside those tokens. The loss is then the KL divergence of the distribution
coarsened to the kept tokens plus one bin for all the others (`losses.distill.top_kl_loss`): exact
when one token or none is left out, and otherwise a lower bound of the full KL that matches the
teacher's probabilities of the kept tokens one by one and of the rest only in sum.

An entry is keyed by what decides the targets: the teacher's identity (its model config without
placement, or a fingerprint of its weights when it was handed over in memory), its dtype and
device type, bfloat16 autocast, the temperature, `cache_top`, and a fingerprint of the windows
themselves (so another corpus, tokenizer, seed, length or token count misses). Entries are
safetensors files under `<cache>/heal-teacher/` (`SHRINK_TEACHER_CACHE` overrides the folder;
delete it to reset), written atomically so parallel sweep jobs never read half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data.assets import cache_root, fingerprint
from ..errors import NumericalError, ShrinkError

# names of the per-window tensors an entry holds, as the healer's batches carry them
TOP_VALUES, TOP_INDEX, LOG_PARTITION, LOG_REST = "teacher_top", "teacher_index", "teacher_lse", "teacher_rest"


def cache_dir() -> Path:
    env = os.environ.get("SHRINK_TEACHER_CACHE")
    return Path(env) if env else cache_root() / "heal-teacher"


def check_top(top: int, vocab: int) -> None:
    """At least one kept token, and fewer than the vocabulary: at vocab − 1 the cached KL is
    already the full one, so more only costs disk."""
    if not 1 <= top < vocab:
        raise ShrinkError(f"heal.cache_top={top} must be in [1, {vocab - 1}]: the model has {vocab} tokens")


def weights_fingerprint(model: nn.Module) -> str:
    """A model's identity when nothing else names it: a hash of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def dense_teacher(
    model_cfg: DictConfig,
    dtype: torch.dtype,
    seed: int,
    copy: nn.Module | None = None,
    offload_folder: Path | None = None,
) -> tuple[Callable[[], nn.Module], dict[str, Any] | None]:
    """(a loader of the `kd` teacher, its identity for the cache): the model `model_cfg` names,
    loaded in `dtype` (spread by accelerate when `model_cfg.device_map` is set, converting what it
    offloads to `offload_folder`), and named by its config without placement (and the seed of a
    tiny random model); or `copy`, a model handed over in memory, which only its weights'
    fingerprint names (identity None)."""
    from ..models import load_model, model_identity  # not at import: the healer registry stays light

    if copy is not None:
        return (lambda: copy), None
    identity = model_identity(model_cfg, seed) | {"dtype": str(dtype)}
    return (lambda: load_model(model_cfg, dtype, seed=seed, offload_folder=offload_folder).model), identity


def place_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher on the heal's device, for inference; a teacher spread by a device map stays
    where accelerate put it (its hooks bring each module's weights to its execution device, and
    the logits come back on the last module's)."""
    from ..models.device_map import is_mapped

    if not is_mapped(teacher):
        teacher.to(device)
    return teacher.eval().requires_grad_(False)


def entry_key(
    identity: dict[str, Any], windows: torch.Tensor, temperature: float, top: int, bf16: bool
) -> str:
    data = {
        "teacher": identity,
        "windows": [fingerprint(windows), list(windows.shape)],
        "temperature": temperature,
        "top": top,
        "bf16": bf16,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def teacher_targets(
    teacher: nn.Module,
    windows: torch.Tensor,
    temperature: float,
    top: int,
    device: torch.device,
    bf16: bool,
    batch: int = 1,
) -> dict[str, torch.Tensor]:
    """The cached targets of every window (one row per window), from the teacher's logits."""
    check_top(top, int(teacher.get_output_embeddings().weight.shape[0]))
    place_teacher(teacher, device)
    # filled in place: small per-window tensors kept between the forwards' large temporaries
    # fragment the heap (measured: 41 MB of resident memory more per window on SmolLM2)
    count, length = windows.shape
    targets = {
        TOP_VALUES: torch.empty(count, length, top),
        TOP_INDEX: torch.empty(count, length, top, dtype=torch.int32),
        LOG_PARTITION: torch.empty(count, length),
        LOG_REST: torch.empty(count, length),
    }
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in tqdm(range(0, windows.shape[0], batch), desc="teacher targets", unit="window", leave=False):
        ids = windows[start : start + batch].to(device)
        with torch.no_grad(), autocast:
            logits = teacher(input_ids=ids, use_cache=False).logits
        for name, value in top_targets(logits, temperature, top).items():
            targets[name][start : start + len(ids)] = value.cpu()
    return targets


def top_targets(logits: torch.Tensor, temperature: float, top: int) -> dict[str, torch.Tensor]:
    """What the cache keeps of a teacher's logits (… × vocab): the `top` largest tempered logits
    and their token ids, the tempered log-partition, and the log of the tempered exp-sum of the
    other tokens (−inf when there are none)."""
    tempered = logits.float() / temperature
    if not torch.isfinite(tempered).all():
        raise NumericalError("the kd teacher's logits are not finite: its targets cannot be cached")
    values, index = tempered.topk(top, dim=-1)
    return {
        TOP_VALUES: values,
        TOP_INDEX: index.to(torch.int32),
        LOG_PARTITION: tempered.logsumexp(-1),
        LOG_REST: tempered.scatter(-1, index, float("-inf")).logsumexp(-1),
    }


def cached_targets(
    key: str, build: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """(the entry `key`, whether it was already there); built and stored when it was not."""
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path), True
        except (OSError, ValueError, RuntimeError):
            pass  # an unreadable entry is built again
    targets = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=key, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in targets.items()}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return targets, False
