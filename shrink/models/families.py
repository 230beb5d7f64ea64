"""Adapters for the supported architecture families: where blocks and their linears live."""

from __future__ import annotations

from torch import nn

from .base import Adapter, HeadLayout


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2, Gemma-3 text: pre-norm blocks, gated MLP, grouped-query attention."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma")
    site_paths = {
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": ("mlp.down_proj",),
    }
    head_attributes = {"self_attn": {"num_key_value_groups": "kv_groups"}}

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.layers

    def heads(self) -> HeadLayout:
        c = self.config
        n_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        return HeadLayout(n_heads, getattr(c, "num_key_value_heads", None) or n_heads, head_dim)


class OPTAdapter(Adapter):
    """OPT: fc1/fc2 with biases, ReLU, multi-head attention with biased projections."""

    family = "opt"
    model_types = ("opt",)
    site_paths = {
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.out_proj",),
        "mlp_in": ("fc1",),
        "mlp_out": ("fc2",),
    }
    head_attributes = {"self_attn": {"num_heads": "heads"}}

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.decoder.layers


class BertAdapter(Adapter):
    """BERT / MiniLM / RoBERTa encoders: post-LN blocks, GELU intermediate layer."""

    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    causal = False
    site_paths = {
        "attn_in": ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attn_out": ("attention.output.dense",),
        "mlp_in": ("intermediate.dense",),
        "mlp_out": ("output.dense",),
    }
    head_attributes = {"attention.self": {"num_attention_heads": "heads", "all_head_size": "head_width"}}

    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer


class DistilBertAdapter(Adapter):
    """DistilBERT: post-LN blocks with q_lin/k_lin/v_lin/out_lin and ffn.lin1/lin2."""

    family = "distilbert"
    model_types = ("distilbert",)
    causal = False
    site_paths = {
        "attn_in": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        "attn_out": ("attention.out_lin",),
        "mlp_in": ("ffn.lin1",),
        "mlp_out": ("ffn.lin2",),
    }
    head_attributes = {"attention": {"n_heads": "heads"}}

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
