"""The model configs that come with shrink (`conf/model/*.yaml`), read as files: which names are
taken, what each one stands for, and which work without a hub. Error messages list what is
really there instead of a list kept by hand.

A model is labelled by its name everywhere a run writes it (run folder, summary, metrics, model
card, W&B), so a shipped name must not label a model read from somewhere else: `check_label`
refuses `model.source=local model.path=DIR` on top of `model=smollm2-135m`, which would publish
DIR's weights as SmolLM2. `model=local` (and `model=gguf`) take their name from the path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from ..config import ModelConf, Source, folder_name
from ..errors import ShrinkError

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "model"
# configs that name no model of their own: the name comes from model.path
FROM_PATH = ("local", "gguf")


@functools.cache
def shipped() -> dict[str, dict[str, Any]]:
    """Config name → its YAML as written (interpolations unresolved); empty when the package is
    installed without its `conf/` folder."""
    if not MODEL_CONFIGS.is_dir():
        return {}
    configs = {}
    for file in sorted(MODEL_CONFIGS.glob("*.yaml")):
        try:
            configs[file.stem] = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError:
            continue
    return configs


def offline_models() -> str:
    """The shipped models that need no hub, as one phrase for error messages."""
    by_source: dict[str, list[str]] = {}
    for name, entry in sorted(shipped().items()):
        if name not in FROM_PATH:
            by_source.setdefault(str(entry.get("source")), []).append(name)
    parts = []
    if by_source.get("packaged"):
        parts.append(f"{', '.join(by_source['packaged'])} (packaged)")
    if by_source.get("tiny"):
        parts.append(f"{', '.join(by_source['tiny'])} (tiny random, for tests)")
    parts.append("any local folder (model=local model.path=DIR)")
    return "; ".join(parts)


def is_local_path(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~"))


def local_hint(path: str) -> str:
    """How to load `path` as what it is: a .gguf file or a Hugging Face folder."""
    which = "gguf" if str(path).endswith(".gguf") else "local"
    return f"model={which} model.path={path}"


def check_label(cfg: ModelConf) -> None:
    """Refuse a shipped model's name on a model that config does not describe (another source or
    path): the run would be filed, summarised and published under the wrong name and base model."""
    entry = shipped().get(str(cfg.name))
    if entry is None or str(cfg.name) in FROM_PATH or cfg.source == Source.memory:
        return
    source, path = Source(cfg.source).value, str(cfg.path)
    if source in (Source.local.value, Source.gguf.value) and folder_name(path) == cfg.name:
        return  # a folder that happens to carry a shipped name labels itself
    their_path = entry.get("path")
    same_path = not isinstance(their_path, str) or "${" in their_path or their_path == path
    if str(entry.get("source")) == source and same_path:
        return
    stands_for = f"{entry.get('source')} {their_path}"
    if source in (Source.local.value, Source.gguf.value) or is_local_path(path):
        fix = f"load it with {local_hint(path)} (labelled {folder_name(path)!r}; model.name=… for another)"
    else:
        fix = f"name it too: model.name=<its name> (the card then names {path} as its base model)"
    raise ShrinkError(
        f"model.path={path} is not what model {cfg.name!r} stands for ({stands_for}), whose name and "
        f"base model would label it in the run folder, metrics and model card; {fix}"
    )
