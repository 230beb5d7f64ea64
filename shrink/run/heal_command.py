"""`python -m shrink heal <run or model folder> [heal=kd heal.tokens=… …] [--out DIR]`: heal a
checkpoint saved earlier, apart from compressing it.

The same heal as a run's (`shrink.heal`), on `shrink.load`'s model; the dense teacher of `heal=kd`
is the model the run's `config.yaml` names, placed as the run placed it (or as `model.device_map` /
`model.max_memory` say): a teacher spread by accelerate over GPUs, the CPU and disk runs beside a
student trained whole on `device`, for a dense model too large to sit beside it. The healed
checkpoint goes to `--out` (default `<run>/healed/`): `model/`, `heal.jsonl` and `heal.json`.
Trainer's checkpoints are kept in `<out>/progress/` until it finishes, so the same command run
again goes on where an interrupted one stopped. Because nothing but the heal runs here, the
command runs under `accelerate launch` or `torchrun` as any Trainer script does (one process per
GPU, DDP), and only the main process writes the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from ..checkpoints import save_load as checkpoint
from ..checkpoints.export import checkpoint_folder
from ..config import ModelConf, named_keys
from ..errors import ShrinkError
from ..hardware.devices import resolve_device
from ..heal import HEALERS
from ..heal import checks as heal_checks
from ..heal.recover import heal
from ..heal.teacher_cache import dense_teacher
from ..models import build_adapter
from ..quantization.packing import is_quantized
from .plugins import compose_config
from .validation import check_mapping

# the dense teacher's placement: the only model keys that apply to a saved checkpoint's heal
PLACEMENT = ("model.device_map", "model.max_memory")


def heal_checkpoint(path: Path, overrides: list[str], out: Path | None = None) -> dict[str, Any]:
    """Heal the checkpoint at `path` under the heal overrides; returns the heal's summary."""
    source = checkpoint_folder(path)
    run = source.parent if source.name == "model" and (source.parent / "config.yaml").is_file() else None
    unknown = [o for o in overrides if not o.lstrip("+~").startswith(("heal", "device", "seed", *PLACEMENT))]
    if unknown:
        raise ShrinkError(
            f"{' '.join(unknown)}: only heal, heal.*, device, seed and the teacher's "
            f"{' and '.join(PLACEMENT)} apply to a saved checkpoint"
        )
    cfg = compose_config(*overrides)
    placement = [key for key in PLACEMENT if key in named_keys(overrides)]
    if cfg.heal.name == "none":
        raise ShrinkError(f"heal=none trains nothing; choose one: {', '.join(n for n, _ in HEALERS.items())}")
    if run is not None:
        placed = {key: OmegaConf.select(cfg, key) for key in placement}
        cfg.model = OmegaConf.merge(
            OmegaConf.structured(ModelConf), OmegaConf.load(run / "config.yaml").model
        )
        for key, value in placed.items():  # the run's placement of the dense model, unless overridden
            OmegaConf.update(cfg, key, value, merge=False)
    elif HEALERS[cfg.heal.name].needs_teacher:
        raise ShrinkError(
            f"heal={cfg.heal.name} distils from the dense model, which only a run folder names (its "
            f"config.yaml): give the run folder, not {source}"
        )
    heal_checks.check(cfg, overrides, False)
    if HEALERS[cfg.heal.name].needs_teacher:
        check_mapping(cfg)
    elif placement:
        raise ShrinkError(
            f"{' and '.join(PLACEMENT)} place the dense teacher of heal=kd; heal={cfg.heal.name} has "
            "none: drop them"
        )
    out = out or (source.parent / "healed")
    progress = out / "progress"
    _check_progress(progress, cfg.heal)
    model, tokenizer = checkpoint.load(source), checkpoint.load_tokenizer(source)
    if any(is_quantized(m) for m in model.modules()):
        raise ShrinkError(
            f"{source} is quantized: heal the run's model before quantizing it (heal=… in the run)"
        )
    adapter = build_adapter(model)
    heal_checks.check_model(cfg.heal, adapter)
    device = resolve_device(cfg.device)
    model.to(device)
    # a teacher spread by model.device_map converts what it offloads under progress/, removed at the end
    dtype, offload = next(model.parameters()).dtype, progress / "offload"
    teacher, identity = dense_teacher(cfg.model, dtype, int(cfg.seed), offload_folder=offload)
    log_path = out / "heal.jsonl"
    summary = heal(adapter, tokenizer, teacher, cfg.heal, bool(cfg.model.get("add_bos", False)), device,
                   progress / "heal", log_path, teacher_identity=identity)  # fmt: skip
    if PartialState().is_main_process:
        manifest = checkpoint.read_manifest(source)
        info = {"blocks": adapter.block_widths(), "heal": cfg.heal.name}
        checkpoint.save(model.to("cpu"), tokenizer, out / "model", manifest["head"], info)
        (out / "heal.json").write_text(
            json.dumps({"source": str(source), "config": _plain(cfg.heal), **summary})
        )
        shutil.rmtree(progress, ignore_errors=True)
    return summary


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _check_progress(progress: Path, heal_cfg: DictConfig) -> None:
    """An interrupted heal is continued only under the same heal config."""
    saved = progress / "heal.yaml"
    if saved.is_file():
        if _plain(OmegaConf.load(saved)) != _plain(heal_cfg):
            raise ShrinkError(
                f"{progress} holds an interrupted heal under another heal config: run it with the same "
                "overrides to continue it, or delete that folder"
            )
        return
    progress.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(heal_cfg, saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrink heal", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run folder or its model/ folder")
    parser.add_argument("overrides", nargs="*", help="heal=lora|kd and heal.* keys, device=, seed=")
    parser.add_argument("--out", type=Path, help="where the healed checkpoint goes (default <run>/healed)")
    args = parser.parse_args(argv)
    try:
        summary = heal_checkpoint(args.folder, args.overrides, args.out)
    except ShrinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = summary.get("seconds", 0.0)
    print(
        f"healed: heal={summary['name']} {summary.get('tokens', 0)} tokens in {seconds:.0f}s; "
        f"loss {summary.get('loss_first')} -> {summary.get('loss_last')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
