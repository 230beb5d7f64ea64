"""`python -m shrink export <run or model folder> [--out DIR]`: give a shrink checkpoint the
Hugging Face files of the current release (config.json, and the modeling file where its structure
needs it) and its model card; with `--gguf [--type q8_0] [--vocab FILE]`, write it as a GGUF file
that llama.cpp runs instead (`gguf_file`).

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
from .save_load import MANIFEST, find_checkpoint, load, read_manifest


def checkpoint_folder(path: Path) -> Path:
    """The model folder of `path` (a run folder or the model folder itself)."""
    folder = find_checkpoint(path)
    if folder is not None:
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


def export_gguf(path: Path, kind: str, out: Path | None = None, vocab: Path | None = None) -> list[str]:
    """Write the checkpoint at `path` as a GGUF file of `kind` for llama.cpp (`gguf_file`), by
    default `<run>/model-<kind>.gguf`; the tokenizer comes from `vocab` or the base model's GGUF."""
    from . import gguf_file

    gguf_file.check_type(kind)  # before the checkpoint loads
    source = checkpoint_folder(path)
    run = source.parent if source.name == "model" else source
    model = load(source)
    gguf_file.check_model(model)
    keys = gguf_file.vocab_from_gguf(vocab) if vocab is not None else _base_vocab(run, source, model)
    target = out if out is not None else gguf_file.default_name(run, kind)
    gguf_file.write(model, target, kind, keys, name=run.name)
    lines = [f"{target}: {kind} GGUF for llama.cpp ({target.stat().st_size / 2**20:.1f} MB)"]
    zeros, thinned = gguf_file.padded_weights(model)
    if zeros:
        blocks = len(build_adapter(model).blocks())
        weights = sum(p.numel() for p in model.parameters())  # tied ones once
        lines.append(
            f"  {thinned} of {blocks} blocks have thinned heads, written padded back to the head size "
            f"(llama.cpp takes one): {zeros / 1e6:.2f}M zero weights beside the model's "
            f"{weights / 1e6:.2f}M, read at every token; a model compressed with method.attention=heads "
            "(whole heads) has none"
        )
    return lines


def _base_vocab(run: Path, source: Path, model) -> dict:
    """The tokenizer of the run's base model: its GGUF (packaged, or `model=gguf`), or the byte
    vocabulary of a tiny test model."""
    from omegaconf import OmegaConf

    from ..models.packaged import packaged_gguf
    from . import gguf_file
    from .save_load import load_tokenizer

    config = run / "config.yaml"
    model_cfg = OmegaConf.load(config).model if config.is_file() else None
    source_kind = str(model_cfg.source) if model_cfg is not None else ""
    if source_kind == "packaged":
        found = packaged_gguf(str(model_cfg.path))
        if found is not None:
            return gguf_file.vocab_from_gguf(found)
    if source_kind == "gguf":
        return gguf_file.vocab_from_gguf(Path(str(model_cfg.path)).expanduser())
    if source_kind == "tiny":
        rows = model.get_input_embeddings().num_embeddings
        return gguf_file.byte_vocab(load_tokenizer(source), rows)
    raise ShrinkError(
        f"{run}: no GGUF of the base model to take the tokenizer from (packaged and model=gguf models "
        "have one); pass --vocab FILE.gguf, a GGUF of the base model"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrink export", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run folder or its model/ folder")
    parser.add_argument("--out", type=Path, help="write the exported folder (or GGUF file) here")
    parser.add_argument("--gguf", action="store_true", help="write a GGUF file for llama.cpp instead")
    parser.add_argument("--type", default="f16", help="GGUF type: f32 f16 bf16 q8_0 q4_k_m q5_k_m q6_k …")
    parser.add_argument("--vocab", type=Path, help="a GGUF of the base model to take the tokenizer from")
    args = parser.parse_args(argv)
    try:
        lines = (
            export_gguf(args.folder, args.type, args.out, args.vocab)
            if args.gguf
            else export(args.folder, args.out)
        )
        for line in lines:
            print(line)
    except ShrinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
