"""Run SliceGPT's own code (github.com/microsoft/TransformerCompression: `layernorm_fusion.
replace_layers` and `fuse_modules`, then `rotate.rotate_and_slice` with PCA orientation, as its
`experiments/run_slicegpt.py` drives them) on SmolLM2-135M with shrink's calibration and test
windows, for the faithfulness comparison on the results page. It runs in the side virtual
environment of bench/flap_reference.py (transformers 4.44; the code pins 4.41), never in shrink's:

    .venv/bin/python bench/flap_reference.py windows --out /tmp/ref/windows.pt     # shrink's tokens
    /tmp/flap-venv/bin/python bench/slicegpt_reference.py run --repo /path/to/TransformerCompression \\
        --windows /tmp/ref/windows.pt --sparsity 0.25 --out /tmp/ref/slicegpt-0.25.json
    .venv/bin/python launch.py method=slicegpt method.slicing=0.25 ...        # shrink, same width
    .venv/bin/python bench/slicegpt_reference.py compare /tmp/ref/slicegpt-0.25.json RUN/model

What differs from `run_slicegpt.py`, each forced by this comparison or this machine: the
calibration text is shrink's 16 windows of 512 `wiki` tokens in batches of 4 (the script draws 128
WikiText-2 sequences of 2048 from the hub); the model is float32 on the CPU (the script loads
float16 for a GPU); `ml_collections`, which only holds the code's device setting, is stood in for.
By default the embedding keeps its width and the first block reads it whole, as shrink does (a
slicing scheduler whose embedding and first attention input are the full width: the code then
rotates the embedding without slicing it); `--slice-embeddings` runs the code's own constant
scheduler, which slices the embedding as well and so unties SmolLM2's tied LM head.
`--no-center` drops the code's mean subtraction from the embedding, which it applies to every
model; under an RMSNorm (Llama) that changes the function, and shrink does not do it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from flap_reference import MODEL, _perplexity, reference_cli  # noqa: E402

CENTERING = "W.weight.data = (W_ - W_.mean(dim=-1, keepdim=True)).to(W.weight.data.dtype)"


def _adapted_src(repo: Path, center: bool) -> Path:
    """The package at the checkout's HEAD, with the embedding's centring dropped if asked."""
    folder = Path(tempfile.mkdtemp(prefix="slicegpt-"))
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "HEAD", "src/slicegpt"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    fusion = folder / "src" / "slicegpt" / "layernorm_fusion.py"
    text = fusion.read_text()
    if CENTERING not in text:
        raise SystemExit("layernorm_fusion.py has no such centring: another revision than the one measured")
    if not center:
        fusion.write_text(text.replace(CENTERING, "pass"))
    return folder / "src"


def run(args: argparse.Namespace) -> None:
    from transformers import LlamaForCausalLM

    config_dict = types.SimpleNamespace  # ml_collections.ConfigDict: attribute access is all it needs
    sys.modules["ml_collections"] = types.SimpleNamespace(ConfigDict=config_dict)
    # the package's data loaders go unused (the windows are given); its `datasets` import is stood in for
    sys.modules["datasets"] = types.SimpleNamespace(DatasetDict=dict, Dataset=list)
    sys.path.insert(0, str(_adapted_src(args.repo, not args.no_center)))
    from slicegpt import layernorm_fusion, rotate
    from slicegpt.adapters.llama_adapter import LlamaModelAdapter
    from slicegpt.config import config
    from slicegpt.slicing_scheduler import ConstSlicingScheduler

    config.device, config.dtype = torch.device("cpu"), torch.float32
    found = torch.load(args.windows, weights_only=True)  # token ids only
    # the folder's config keeps rope_theta under rope_parameters (transformers 5), unread by 4.44
    model = LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32, rope_theta=100000.0).eval()
    adapter = LlamaModelAdapter(model)
    hidden = adapter.hidden_size
    dense_blocks = sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)
    layernorm_fusion.replace_layers(adapter)
    layernorm_fusion.fuse_modules(adapter)
    width = int((1 - args.sparsity) * hidden)
    width -= width % args.round_interval

    class KeepEmbedding(ConstSlicingScheduler):
        """The embedding and the first block's input at full width, every other width sliced."""

        def _get_input_embedding_dimensions(self) -> dict[int, int]:
            return defaultdict(lambda: hidden)

        def _get_attention_input_dimension(self, idx: int) -> int:
            return hidden if idx == 0 else self.dimension

    scheduler = (ConstSlicingScheduler if args.slice_embeddings else KeepEmbedding)(width)
    calib = found["calib"]
    loader = [
        {"input_ids": calib[i : i + 4], "attention_mask": torch.ones_like(calib[i : i + 4])}
        for i in range(0, len(calib), 4)
    ]
    with torch.no_grad():
        rotate.rotate_and_slice(adapter, loader, scheduler, final_orientation="pca")
        ppl = {n: _perplexity(model, found[n]) for n in ("wiki", "c4-sample")}
    kept_blocks = sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)
    layers = model.model.layers
    result = {
        "sparsity": args.sparsity, "width": width, "slice_embeddings": args.slice_embeddings,
        "center": not args.no_center, "kept_fraction": kept_blocks / dense_blocks,
        "params": sum(p.numel() for p in model.parameters()), "ppl": ppl,
        "o_proj": [layer.self_attn.o_proj.weight.tolist() for layer in layers[:2]],
    }  # fmt: skip
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "o_proj"}))


def compare(reference: Path, checkpoint: Path) -> None:
    """The first two blocks' o_proj rows (the stream's kept directions between attention and MLP,
    each as Qᵀ·W_o): the same up to each eigenvector's sign when both took the same PCA."""
    import shrink

    ref = json.loads(reference.read_text())
    ours = shrink.load(checkpoint)
    for i, rows in enumerate(ref["o_proj"]):
        theirs = torch.tensor(rows, dtype=torch.float64)
        mine = ours.model.layers[i].self_attn.o_proj.weight.detach().to(torch.float64)
        if mine.shape != theirs.shape:
            print(f"block {i}: o_proj {tuple(mine.shape)} against the reference's {tuple(theirs.shape)}")
            continue
        gap = torch.minimum((mine - theirs).norm(dim=1), (mine + theirs).norm(dim=1)) / theirs.norm(dim=1)
        print(
            f"block {i}: o_proj rows within {float(gap.max()):.2e} of the reference's (relative, up to sign)"
        )


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--repo", type=Path, required=True, help="a git checkout of TransformerCompression")
    r.add_argument("--windows", type=Path, required=True)
    r.add_argument("--sparsity", type=float, required=True, help="SliceGPT's share of the width sliced")
    r.add_argument("--round-interval", type=int, default=8)
    r.add_argument("--slice-embeddings", action="store_true", help="the code's own constant scheduler")
    r.add_argument("--no-center", action="store_true", help="keep the embedding's mean")


def main() -> None:
    reference_cli(__doc__, _run_arguments, run, compare)


if __name__ == "__main__":
    main()
