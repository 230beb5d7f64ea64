"""`python -m shrink export RUN --gguf`: a compressed Llama-family model as a GGUF file for llama.cpp's
`deci` architecture. Per-layer widths as arrays, thinned heads padded back exactly, q/k in
llama.cpp's rotary layout; read back with gguf-py, and run in llama.cpp itself where the
llama-cpp-python extra is installed; structures GGUF cannot hold fail with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shrink.checkpoints import gguf_file
from shrink.checkpoints.export import main
from shrink.checkpoints.save_load import load

from ..conftest import FAST

gguf = pytest.importorskip("gguf")
THIN = [
    "model=tiny-llama", "method=id", "budget=0.5", "schedule=uniform", "method.dims_step=4",
    "method.attention=dims", "method.qk_dims=true", "eval=none", *FAST,
]  # fmt: skip


@pytest.fixture(scope="module")
def thin_run(tmp_path_factory):
    from shrink.run.pipeline import run

    from ..conftest import make_cfg

    folder = tmp_path_factory.mktemp("gguf") / "run"
    run(make_cfg(*THIN), run_dir=folder)
    return folder


def _fields(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def test_the_gguf_holds_per_layer_widths_and_padded_heads(thin_run, capsys):
    out = thin_run / "tiny.gguf"
    assert main([str(thin_run), "--gguf", "--type", "f32", "--out", str(out)]) == 0
    assert "f32 GGUF for llama.cpp" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    fields = _fields(reader)
    model = load(thin_run / "model")
    blocks = model.model.layers
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [b.mlp.down_proj.in_features for b in blocks]
    assert fields["deci.attention.head_count"] == [4, 4] and fields["deci.attention.head_count_kv"] == [2, 2]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 16
    assert len(fields["tokenizer.ggml.tokens"]) == model.get_input_embeddings().num_embeddings
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    for i, block in enumerate(blocks):
        attention = block.self_attn
        assert attention.shrink_widths["v"] < 16 and attention.shrink_widths["k"] < 16
        for role, module, heads in (("q", attention.q_proj, 4), ("k", attention.k_proj, 2)):
            stored = _unpermute(tensors[f"blk.{i}.attn_{role}.weight"], heads)
            places = module.places(torch.device("cpu")).numpy()
            assert stored.shape == (heads * 16, 64)
            assert np.array_equal(stored[places], module.weight.detach().numpy())
            assert not np.delete(stored, places, axis=0).any()  # dropped dims are zero rows
        v = tensors[f"blk.{i}.attn_v.weight"]
        assert v.shape == (2 * 16, 64) and np.count_nonzero(v.any(axis=1)) == 2 * attention.shrink_widths["v"]
        assert tensors[f"blk.{i}.attn_output.weight"].shape == (64, 4 * 16)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses the token embedding


def test_the_export_counts_the_zeros_of_padded_heads(thin_run, capsys):
    from shrink.checkpoints.export import export_gguf
    from shrink.models import load_model

    from ..conftest import make_cfg

    model = load(thin_run / "model")
    zeros, thinned = gguf_file.padded_weights(model)
    expected = 0
    for block in model.model.layers:
        attention = block.self_attn
        for module, heads in ((attention.q_proj, 4), (attention.k_proj, 2), (attention.v_proj, 2)):
            expected += (heads * 16 - module.out_features) * 64
        expected += (4 * 16 - attention.o_proj.in_features) * 64
    assert thinned == 2 and zeros == expected > 0
    lines = export_gguf(thin_run, "f32", out=thin_run / "counted.gguf")
    assert f"{zeros / 1e6:.2f}M zero weights" in lines[1] and "method.attention=heads" in lines[1]
    dense = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0).model
    assert gguf_file.padded_weights(dense) == (0, 0)


def test_q8_0_pads_each_ffn_to_whole_blocks(thin_run):
    model = load(thin_run / "model")
    out = gguf_file.write(
        model, thin_run / "q8.gguf", "q8_0",
        gguf_file.byte_vocab(__import__("shrink").load_tokenizer(thin_run / "model"), 260), "tiny",
    )  # fmt: skip
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    widths = [b.mlp.down_proj.in_features for b in model.model.layers]
    assert any(w % 32 for w in widths)  # the padding is exercised
    assert _fields(reader)["deci.feed_forward_length"] == [w + (-w % 32) for w in widths]


@pytest.mark.parametrize("padded", [False, True], ids=["widths-as-kept", "ffn-padded-to-32"])
def test_llama_cpp_computes_shrinks_logits(thin_run, monkeypatch, padded):
    llama_cpp = pytest.importorskip("llama_cpp", reason='the GGUF extra: pip install -e ".[gguf]"')
    if padded:  # f32 values with the zero neurons a quantized type gets
        monkeypatch.setattr(gguf_file, "FLOATS", ())
    out = thin_run / f"tiny-f32-{padded}.gguf"
    assert main([str(thin_run), "--gguf", "--type", "f32", "--out", str(out)]) == 0
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(0))
    model = load(thin_run / "model").eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0].numpy()
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[: ids.shape[1]])
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny-llama", "method=svd", "budget=0.5"], "is a factor pair"),
        (["model=tiny-opt", "method=id", "budget=0.7"], "model_type 'opt' is not one"),
    ],
)
def test_what_gguf_cannot_hold_fails_with_one_line(run_job, capsys, overrides, message):
    _, run = run_job(*overrides, "eval=none", *FAST)
    capsys.readouterr()  # the run's own output
    assert main([str(run), "--gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(run.glob("*.gguf*"))


def test_an_unknown_type_fails_before_loading(tmp_path, capsys):
    assert main([str(tmp_path), "--gguf", "--type", "q3_x"]) == 2
    err = capsys.readouterr().err
    assert "GGUF type 'q3_x'" in err and "q4_k_m" in err
