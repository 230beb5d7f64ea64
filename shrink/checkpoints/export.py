"""`python -m shrink export <run or model folder> [--out DIR]`: give a shrink checkpoint the
Hugging Face files of the current release (config.json, and the modeling file where its structure
needs it) and its model card.

The checkpoint is loaded (and so checked) with `shrink.load` first; then, in `--out` (a copy) or in
place, it gains config.json: the smaller config when transformers builds its structure from one
(`hf_folder`), else the edits and the modeling file for `trust_remote_code=True`; and a model card
when its run folder (metrics.json, config.yaml) is beside it. A folder that is not a readable
shrink checkpoint fails with one line and exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..errors import ShrinkError
from ..models import build_adapter
from ..quantization.packing import is_quantized
from .hf_folder import write_hf_files
from .save_load import MANIFEST, load, read_manifest


def checkpoint_folder(path: Path) -> Path:
    """The model folder of `path` (a run folder or the model folder itself)."""
    for folder in (path / "model", path):
        if (folder / MANIFEST).is_file():
            return folder
    if (path / "config.json").is_file():
        raise ShrinkError(f"{path} is a Hugging Face folder, not a shrink checkpoint: nothing to export")
    raise ShrinkError(
        f"{path} is neither a run folder nor a shrink checkpoint (no {MANIFEST} in it or in model/)"
    )


def export(path: Path, out: Path | None = None) -> list[str]:
    """Export the checkpoint at `path`; returns one line per thing done (or not, and why)."""
    source = checkpoint_folder(path)
    manifest = read_manifest(source)
    model = load(source)  # checks the weights against the manifest before anything is written
    quant = manifest.get("quantization")
    target = source if out is None else out
    if out is not None:
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
    else:
        tmp = source
    done = []
    packed = quant if any(is_quantized(m) for m in model.modules()) else None
    if write_hf_files(model, manifest["head"], manifest["edits"], tmp, packed):
        done.append(f"config.json: transformers loads {target} as it is")
    else:
        done.append(
            f"config.json + modeling_shrink.py: transformers loads {target} with trust_remote_code=True"
        )
    run = source.parent if source.name == "model" else None
    if run is not None and (run / "metrics.json").is_file() and (run / "config.yaml").is_file():
        from .model_card import write as write_card

        metrics = json.loads((run / "metrics.json").read_text())
        if metrics.get("status") == "ok":
            write_card(run, metrics, tmp, build_adapter(model).block_widths())
            done.append("README.md: the model card, from the run's metrics")
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrink export", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run folder or its model/ folder")
    parser.add_argument("--out", type=Path, help="write the exported folder here (default: in place)")
    args = parser.parse_args(argv)
    try:
        for line in export(args.folder, args.out):
            print(line)
    except ShrinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
