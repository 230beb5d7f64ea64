"""Run LLM-Pruner's own code (github.com/horseee/LLM-Pruner: its `torch_pruning` dependency graph,
`MetaPruner` and `hf_llama_pruner.TaylorImportance`, driven as its `llama3.py --block_wise
--pruner_type taylor --taylor param_first` does) on SmolLM2-135M with shrink's calibration and test
windows, for the faithfulness comparison on the results page. It runs in a side virtual
environment with a transformers release of the code's time (4.44; see bench/flap_reference.py for
how that environment is made), never in shrink's:

    .venv/bin/python bench/flap_reference.py windows --out /tmp/ref/windows.pt     # shrink's tokens
    /tmp/flap-venv/bin/python bench/llm_pruner_reference.py run --repo /path/to/LLM-Pruner \\
        --windows /tmp/ref/windows.pt --ratio 0.5 --out /tmp/ref/llm-pruner-0.5.json
    .venv/bin/python bench/llm_pruner_reference.py compare /tmp/ref/llm-pruner-0.5.json RUN/model

What differs from `llama3.py`, each forced by this comparison or this machine: the calibration
text is shrink's 16 windows of 512 `wiki` tokens (the script draws 10 BookCorpus sequences of 64
from the hub), run forward and backward in batches of 4 windows whose losses are weighted so that
the summed gradient is the one of the whole set's mean loss (one batch of 16 would not fit beside
the eager attention's saved activations); the model is float32 on the CPU with eager attention
(the script loads float16 for a GPU); the pruned range is blocks 4–27 of SmolLM2's 30 (the
script's 4–29 of a 32-block Llama leaves the first four and the last two dense, as here).
`--aligned` also replaces the importance's folding of the query heads into KV groups (position
modulo the KV width) by the heads each group removes, which is how shrink scores them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from flap_reference import MODEL, _perplexity, compare, reference_cli  # noqa: E402

HEAD_DIM, GROUP = 64, 3  # SmolLM2-135M: 9 query heads of 64 over 3 KV heads


# `--aligned`: the importance's folding of query-space vectors (q rows, o columns) into the KV
# width, by position modulo that width, replaced by the sum over each group's own heads
FOLD = "imp = imp.view(len(imp) // min_imp_size, min_imp_size).sum(0)"
ALIGNED = (
    f"imp = imp.view(min_imp_size // {HEAD_DIM}, len(imp) // min_imp_size, {HEAD_DIM}).sum(1).reshape(-1)"
)


def _adapted_repo(repo: Path, aligned: bool) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="llm-pruner-"))
    shutil.copytree(repo / "LLMPruner", folder / "LLMPruner")
    if aligned:
        pruner = folder / "LLMPruner" / "pruner" / "hf_llama_pruner.py"
        text = pruner.read_text()
        if FOLD not in text:
            raise SystemExit("hf_llama_pruner.py has no such fold: another revision than the one measured")
        pruner.write_text(text.replace(FOLD, ALIGNED))
    return folder


def run(args: argparse.Namespace) -> None:
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    sys.path.insert(0, str(_adapted_repo(args.repo, args.aligned)))
    import LLMPruner.torch_pruning as tp
    from LLMPruner.pruner import hf_llama_pruner as llama_pruner

    found = torch.load(args.windows, weights_only=True)  # token ids only
    model = LlamaForCausalLM.from_pretrained(
        MODEL, torch_dtype=torch.float32, rope_theta=100000.0, attn_implementation="eager"
    )
    layers = model.model.layers
    dense_k = [layer.self_attn.k_proj.weight.detach().clone() for layer in layers]
    dense_up = [layer.mlp.up_proj.weight.detach().clone() for layer in layers]
    dense = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
    for p in model.parameters():
        p.requires_grad_(True)
    imp = llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first")
    start, end = 4, len(layers) - 2
    forward_prompts = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338],
                                    [1, 3439, 17632, 1925, 29892, 278, 6368, 310]])  # fmt: skip
    pruner = tp.pruner.MetaPruner(
        model, forward_prompts, importance=imp, global_pruning=False, iterative_steps=1,
        ch_sparsity=args.ratio, ignored_layers=[], channel_groups={},
        consecutive_groups={layer.self_attn.k_proj: layer.self_attn.head_dim for layer in layers},
        customized_pruners={LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner}, root_module_types=None,
        root_instances=[layers[i].self_attn.k_proj for i in range(start, end)]
        + [layers[i].mlp.gate_proj for i in range(start, end)],
    )  # fmt: skip
    model.zero_grad()
    calib = found["calib"]
    for first in range(0, len(calib), 4):
        ids = calib[first : first + 4]
        loss = model(ids, labels=ids).loss * (len(ids) / len(calib))
        loss.backward()
    pruner.step()
    for layer in layers:
        layer.self_attn.num_heads = layer.self_attn.q_proj.weight.shape[0] // HEAD_DIM
        layer.self_attn.num_key_value_heads = layer.self_attn.k_proj.weight.shape[0] // HEAD_DIM
    model.zero_grad()
    kept_params = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
    kept = []
    for i, layer in enumerate(layers):
        k, up = layer.self_attn.k_proj.weight.detach(), layer.mlp.up_proj.weight.detach()
        heads = dense_k[i].view(-1, HEAD_DIM * k.shape[1])
        groups = sorted(int(((heads - g) ** 2).sum(1).argmin()) for g in k.view(-1, HEAD_DIM * k.shape[1]))
        rows = {tuple(r[:8].tolist()): j for j, r in enumerate(dense_up[i])}
        kept.append({"groups": groups, "neurons": sorted(rows[tuple(r[:8].tolist())] for r in up)})
    with torch.no_grad():
        ppl = {n: _perplexity(model, found[n]) for n in ("wiki", "c4-sample")}
    result = {"ratio": args.ratio, "aligned": args.aligned, "kept_fraction": kept_params / dense, "ppl": ppl,
              "kept": kept}  # fmt: skip
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "kept"}))


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--repo", type=Path, required=True, help="a checkout of horseee/LLM-Pruner")
    r.add_argument("--windows", type=Path, required=True)
    r.add_argument("--ratio", type=float, required=True, help="LLM-Pruner's pruning ratio per pruned block")
    r.add_argument("--aligned", action="store_true", help="fold query heads into their own KV group")


def main() -> None:
    reference_cli(__doc__, _run_arguments, run, compare)


if __name__ == "__main__":
    main()
