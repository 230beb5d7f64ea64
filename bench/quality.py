"""Quality of `id`'s options: held-out perplexity on two corpora, per budget.

Each variant is a set of overrides on top of the default run (`id`, the default calibration);
every run is evaluated on the held-out parts of the offline Wikipedia text (the calibration
corpus's own domain), of the offline C4 sample (another domain) and of the offline fiction
(LAMBADA's passages from novels: a third kind of text, in no default calibration set), and the
table gives each as a multiple of the dense model's. Runs whose metrics.json exists are reused, so an
interrupted bench resumes.

    .venv/bin/python bench/quality.py                                   # README table
    .venv/bin/python bench/quality.py --budgets 0.8 --variants stat bias
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

H = ["method.attention=heads"]  # whole heads (STAT's), as id did before thinner heads
U = ["schedule=uniform", *H]
G = ["schedule=greedy", "schedule.error=residual"]  # = greedy-residual, id's default allocation
# the default calibration and fold before the current ones: 16×512 Wikipedia tokens, fixed ridge
# (the rows of the results page measured before them ran with these; see docs/results.md)
W = ["calib=wiki", "method.ridge_cv=0"]
M = ["calib=mix", "calib.nsamples=32"]  # 16k tokens of Wikipedia and C4 text
VARIANTS: dict[str, list[str]] = {
    # id's defaults: greedy-residual, attention=auto (thin value dims; whole heads only when needed),
    # 16k mix calibration (planning pass on its first half), the fold's ridge cross-validated
    "default": [],
    "previous-default": W,
    "default-uniform": ["schedule=uniform"],  # id's defaults without the allocation
    "previous-uniform": ["schedule=uniform"],  # the same on the previous calibration and ridge
    # folds, under the uniform allocation
    "stat": U,  # STAT's fold and allocation, as published
    "bias": [*U, "method.bias=true"],  # affine fold (bias compensation)
    "dense": [*U, "method.target=dense"],  # error-correcting fold
    "bias+dense": [*U, "method.bias=true", "method.target=dense"],
    # allocations (whole heads)
    "greedy": ["schedule=greedy", *H],  # STAT's, errors relative to each unit
    "greedy+bias+dense": ["schedule=greedy", *H, "method.bias=true", "method.target=dense"],
    "greedy-res": [*G, *H],
    "greedy-down": ["schedule=greedy", "schedule.error=downstream", *H],
    # attention units under greedy-residual
    "greedy-res+dims": [*G, "method.attention=dims"],
    "greedy-res+both": [*G, "method.attention=both"],
    # the fold switches under greedy-residual, whole heads (the ablation)
    "greedy-res+bias": [*G, *H, "method.bias=true"],
    "greedy-res+dense": [*G, *H, "method.target=dense"],
    # calibration size and domain (16 × 512 wiki tokens by default), greedy-residual, whole heads
    "greedy-res-16k": [*G, *H, "calib.nsamples=32"],
    "greedy-res-16k-1024": [*G, *H, "calib.nsamples=16", "calib.seq_len=1024"],
    "greedy-res-mix-16k": [*G, *H, "calib=mix", "calib.nsamples=32"],
    "greedy-res-32k": [*G, *H, "calib.nsamples=64"],
    "greedy-res-mix-32k": [*G, *H, "calib=mix", "calib.nsamples=64"],
    "default+bias": ["method.bias=true"],
    "default+qk": ["method.qk_dims=true"],  # thinner queries and keys too
    "default-qk": ["method.qk_dims=true"],  # the same on today's defaults
    "default+qk-p4": ["method.qk_dims=true", "method.qk_probe_windows=4"],
    # calibration with id's defaults
    "default-mix-32k": ["calib=mix", "calib.nsamples=64"],
    "default-128k": ["calib.nsamples=256"],
    "default-c4": ["calib=c4-sample"],
    # the fold's ridge cross-validated per layer over groups of calibration windows
    "default+cv": ["method.ridge_cv=4"],
    "default+cv8": ["method.ridge_cv=8"],
    "default-ridge0.1": ["method.ridge=0.1"],
    "default+cv2": ["method.ridge_cv=2"],
    "default-bf16": ["calib.autocast=bfloat16"],  # the calibration forwards in bf16
    "default+cv-bf16": ["method.ridge_cv=4", "calib.autocast=bfloat16"],
    "default-bf16-mix-16k": ["calib.autocast=bfloat16", "calib=mix", "calib.nsamples=32"],
    "default-bf16-mix-16k+cv": [*M, "calib.autocast=bfloat16", "method.ridge_cv=4"],
    # 16k mixed calibration in float32 passes; the current default is default-mix-16k+cv2-p16
    "default-mix-16k": M,
    "default-mix-16k+cv": [*M, "method.ridge_cv=4"],
    "default-mix-16k+cv2-p16": [*M, "method.ridge_cv=2", "calib.profile_share=0.5"],
    "default-mix-16k+cv2": [*M, "method.ridge_cv=2", "calib.profile_share=1.0"],
    "default-mix-16k+cv4-p16": [*M, "method.ridge_cv=4", "calib.profile_share=0.5"],
    "default-mix-16k+cv2-p16bf": [
        *M,
        "method.ridge_cv=2",
        "calib.profile_share=0.5",
        "calib.profile_autocast=bfloat16",
    ],  # the planning pass in bf16
    # allocation by search, seeded with greedy-residual's plan
    "default-search": ["schedule=search"],  # on the current defaults
    "search": ["schedule=search"],
    "search+cv": ["schedule=search", "method.ridge_cv=4"],
    "search-w8": ["schedule=search", "schedule.windows=8"],
    # the low-rank methods' dense-target refit (SVD-LLM's update of the left factor)
    "svdllm": ["method=svdllm"],
    "svdllm+dense": ["method=svdllm", "method.target=dense"],
    "rom": ["method=rom"],
    "rom+dense": ["method=rom", "method.target=dense"],
    # the reference structured pruners (their own default allocation; see docs/methods)
    "flap": ["method=flap"],  # AL-AM (schedule=threshold), WIFV, bias compensation
    "flap-dense": ["method=flap", "propagate=dense"],  # statistics of the dense model, as FLAP's code
    "flap-ulum": ["method=flap", "schedule=uniform"],  # FLAP's UL-UM
    "wanda-sp": ["method=wanda-sp"],  # uniform, as FLAP's code runs it
    "shortgpt": ["method=shortgpt"],  # whole blocks by Block Influence (schedule=threshold)
    "shortgpt-angular": ["method=shortgpt", "method.metric=angular"],
    # Gromov et al.: one run of consecutive blocks, angular distance of the last tokens
    "shortgpt-gromov": [
        "method=shortgpt",
        "method.selection=run",
        "method.metric=angular",
        "method.tokens=last",
    ],
    "llm-pruner": ["method=llm-pruner"],  # Taylor importance; blocks 4–27 of 30 at one share (span)
    "llm-pruner-global": ["method=llm-pruner", "schedule=threshold"],  # its global pruning
    "slicegpt": ["method=slicegpt"],  # PCA rotation of the residual stream, one sliced width
}


# variants measured on today's defaults; every other one is pinned to the previous calibration and
# fixed ridge (`W`), so that the tables measured before reproduce
CURRENT = {"default", "default-uniform", "default-search", "default-qk"}


def _method(variant: str) -> list[str]:
    """`method=id` unless the variant names its own method."""
    return [] if any(a.startswith("method=") for a in VARIANTS[variant]) else ["method=id"]


def _overrides(variant: str) -> list[str]:
    """The variant's overrides, with the previous calibration and ridge unless it is `CURRENT` or
    sets them itself."""
    own = VARIANTS[variant]
    if variant in CURRENT:
        return own
    pinned = [] if any(a.startswith("calib=") for a in own) else ["calib=wiki"]
    if "calib=mix" in own and not any(a.startswith("calib.profile_share=") for a in own):
        pinned.append("calib.profile_share=1.0")  # the planning pass read every window
    is_id = all(not a.startswith("method=") or a == "method=id" for a in own)
    if is_id and not any(a.startswith("method.ridge_cv=") for a in own):
        pinned.append("method.ridge_cv=0")
    return [*pinned, *own]


def run(out: Path, model: str, variant: str, budget: float, tokens: int) -> dict:
    folder = out / f"{variant}-b{budget}"
    metrics = folder / "metrics.json"
    if not metrics.exists() or json.loads(metrics.read_text()).get("status") != "ok":
        cmd = [
            sys.executable, str(ROOT / "launch.py"), f"model={model}", *_method(variant), f"budget={budget}",
            "logger=none", "eval=ppl", "eval.ppl.corpora=[wiki,c4-sample,fiction]",
            f"eval.ppl.max_tokens={tokens}",
            "save_model=false", f"hydra.run.dir={folder}", "resume=true", *_overrides(variant),
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            return {"variant": variant, "budget": budget, "error": lines[-1] if lines else "failed"}
    m = json.loads(metrics.read_text())
    ppl = m["eval"]["ppl"]
    return {
        "variant": variant,
        "budget": budget,
        "achieved": m["budget_achieved"],
        "wiki": ppl["wiki"]["compressed"],
        "wiki_x": ppl["wiki"]["compressed"] / ppl["wiki"]["dense"],
        "c4": ppl["c4-sample"]["compressed"],
        "c4_x": ppl["c4-sample"]["compressed"] / ppl["c4-sample"]["dense"],
        "fiction": ppl.get("fiction", {}).get("compressed", float("nan")),
        "dense": {k: v["dense"] for k, v in ppl.items()},
        "compress_s": m["compress_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(args.out, args.model, v, b, args.tokens) for b in args.budgets for v in args.variants]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    dense = next((r["dense"] for r in rows if "error" not in r), {})
    print(f"{args.model}: held-out ppl, {args.tokens} tokens per corpus; dense " + ", ".join(
        f"{k} {v:.2f}" for k, v in dense.items()
    ))  # fmt: skip
    print("| budget | variant | achieved | wiki ppl | ×dense | C4 ppl | ×dense | fiction ppl | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['budget']} | {r['variant']} | error: {r['error']} ||||||")
            continue
        print(
            f"| {r['budget']} | {r['variant']} | {r['achieved']:.4f} | {r['wiki']:.2f} | {r['wiki_x']:.3f} | "
            f"{r['c4']:.2f} | {r['c4_x']:.3f} | {r['fiction']:.2f} | {r['compress_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
