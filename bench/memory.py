"""Peak memory of compression with and without `stream=true`, in units of one block.

For each depth (the first `d` blocks of the model, from a local copy whose config says `d` layers
and whose weights are links to the model's shards) it launches the same run with the model loaded
and with its blocks streamed from the shards, and prints each run's peak RSS next to: the process
after its imports (Python, torch, transformers), the weights outside the blocks, and one block's
weights, all in MB and the peak also in blocks. A streamed run's peak should not grow with depth.

    .venv/bin/python bench/memory.py                             # SmolLM2-135M, depths 10 and 30
    .venv/bin/python bench/memory.py --method svdllm --depths 30 --out bench/results/memory-svdllm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.models.streaming import load_streamed, model_folder  # noqa: E402
from shrink.run.pipeline import validate  # noqa: E402
from shrink.run.plugins import load_plugins  # noqa: E402


def mb(tensors) -> float:
    """Size of distinct tensors (a tied embedding counts once)."""
    distinct = {(t.data_ptr(), t.numel()): t for t in tensors if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in distinct.values()) / 2**20


def truncated_copy(source: Path, depth: int, out: Path) -> Path:
    """`source` with a config of `depth` layers; the shards are linked, not copied."""
    folder = out / f"model-{depth}-layers"
    folder.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        target = folder / file.name
        if file.name == "config.json":
            config = json.loads(file.read_text()) | {"num_hidden_layers": depth}
            target.write_text(json.dumps(config))
        elif not target.exists():
            target.symlink_to(file.resolve())
    return folder


def import_baseline_mb() -> float:
    code = "import shrink.run.pipeline, shrink.hardware.memory; print(shrink.hardware.memory.peak_mb())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout)


def launch(folder: Path, run_dir: Path, stream: bool, method: str) -> dict:
    if not (run_dir / "metrics.json").exists():
        cmd = [
            sys.executable, str(ROOT / "launch.py"), "model=local", f"model.path={folder}",
            f"method={method}", f"stream={str(stream).lower()}", "eval=none", "logger=none",
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="id")
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    load_plugins()

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "eval=none"])
    validate(cfg)
    source = model_folder(cfg.model)
    peaks: dict[tuple[int, bool], float] = {}
    for depth in args.depths:
        folder = truncated_copy(source, depth, args.out)
        for stream in (False, True):
            run_dir = args.out / f"{args.method}-{depth}-{'stream' if stream else 'loaded'}"
            peaks[depth, stream] = launch(folder, run_dir, stream, args.method)["peak_rss_mb"]
    baseline = import_baseline_mb()
    loaded, fetch = load_streamed(cfg.model, torch.float32)
    outside = mb(loaded.model.state_dict().values())
    block = mb(fetch(0).values())
    calib = cfg.calib.nsamples * cfg.calib.seq_len * loaded.model.config.hidden_size * 4 / 2**20
    lines = [
        f"{args.model}, method={args.method}, budget {cfg.budget}, eval=none; one block {block:.1f} MB fp32, "
        f"outside the blocks {outside:.1f} MB, process after imports {baseline:.0f} MB, one copy of the "
        f"calibration activations {calib:.1f} MB",
        "",
        "| blocks | model MB | peak RSS loaded | peak RSS stream=true | stream peak − imports, in blocks |",
        "|---|---|---|---|---|",
    ]
    for depth in args.depths:
        loaded_peak, stream_peak = peaks[depth, False], peaks[depth, True]
        lines.append(
            f"| {depth} | {outside + depth * block:.0f} | {loaded_peak:.0f} MB | {stream_peak:.0f} MB | "
            f"{(stream_peak - baseline) / block:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    (args.out / "memory.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
