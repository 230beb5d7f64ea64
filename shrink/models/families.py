"""Adapters for the supported architecture families: where blocks and their linears live."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AttentionPaths, HeadLayout


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2, Gemma-3 text: pre-norm blocks, gated MLP, grouped-query attention."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma")
    attention_paths = AttentionPaths(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj"
    )
    mlp_paths = {
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": ("mlp.down_proj",),
    }
    head_attributes = {"self_attn": {"num_key_value_groups": "kv_groups"}}
    thin_style = "rotary"
    final_norm_path = "norm"
    head_config_keys = {
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
    }
    stream_paths = {
        "attn_norm": "input_layernorm",
        "attn": "self_attn",
        "mlp_norm": "post_attention_layernorm",
    }

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.layers

    def stream_taps(self) -> dict[str, str] | None:
        """Gemma's blocks norm the attention and MLP outputs too (and scale by 1 + weight): not the
        plain pre-norm form."""
        return None if self.config.model_type.startswith("gemma") else super().stream_taps()

    def heads(self) -> HeadLayout:
        c = self.config
        n_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        return HeadLayout(n_heads, getattr(c, "num_key_value_heads", None) or n_heads, head_dim)

    def qk_units(self, block: nn.Module) -> tuple[tuple[int, ...], ...] | None:
        """Rotary pairs: HF's rotate_half turns dims i and i + head_dim/2 together at one
        frequency, so a pair is kept or dropped whole (its zero stays zero under rotation). A
        per-head norm of q/k (Qwen3, Gemma) would see the padded zeros: no thinning there."""
        attention = block.get_submodule(self.attention_paths.q.rpartition(".")[0])
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return None
        if float(getattr(self.config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            return None
        half = self.heads().head_dim // 2
        return tuple((i, i + half) for i in range(half))


class OPTAdapter(Adapter):
    """OPT: fc1/fc2 with biases, ReLU, multi-head attention with biased projections."""

    family = "opt"
    model_types = ("opt",)
    attention_paths = AttentionPaths(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj"
    )
    mlp_paths = {
        "mlp_in": ("fc1",),
        "mlp_out": ("fc2",),
    }
    head_attributes = {"self_attn": {"num_heads": "heads"}}
    thin_style = "opt"
    final_norm_path = "decoder.final_layer_norm"
    ffn_config_key = "ffn_dim"
    stream_paths = {"attn_norm": "self_attn_layer_norm", "attn": "self_attn", "mlp_norm": "final_layer_norm"}
    extra_embeddings = ("decoder.embed_positions",)

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.decoder.layers

    def stream_taps(self) -> dict[str, str] | None:
        """OPT-350m norms after attention and MLP (post-norm), and projects its embeddings in and
        out of a narrower width: neither is the plain pre-norm form."""
        c = self.config
        if not c.do_layer_norm_before or c.word_embed_proj_dim != c.hidden_size:
            return None
        return super().stream_taps()


class BertAdapter(Adapter):
    """BERT / MiniLM / RoBERTa encoders: post-LN blocks, GELU intermediate layer."""

    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    causal = False
    attention_paths = AttentionPaths(
        q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense"
    )
    mlp_paths = {
        "mlp_in": ("intermediate.dense",),
        "mlp_out": ("output.dense",),
    }
    head_attributes = {"attention.self": {"num_attention_heads": "heads", "all_head_size": "head_width"}}

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer


class DistilBertAdapter(Adapter):
    """DistilBERT: post-LN blocks with q_lin/k_lin/v_lin/out_lin and ffn.lin1/lin2."""

    family = "distilbert"
    layers_config_key = "n_layers"
    model_types = ("distilbert",)
    causal = False
    attention_paths = AttentionPaths(
        q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin"
    )
    mlp_paths = {
        "mlp_in": ("ffn.lin1",),
        "mlp_out": ("ffn.lin2",),
    }
    head_attributes = {"attention": {"n_heads": "heads"}}
    ffn_config_key = "hidden_dim"

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.transformer.layer

    def heads(self) -> HeadLayout:
        c = self.config
        return HeadLayout(c.n_heads, c.n_heads, c.dim // c.n_heads)


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, OPTAdapter, BertAdapter, DistilBertAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_class_for(model_type: str) -> type[Adapter] | None:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    return None
