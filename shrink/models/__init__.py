"""Architecture knowledge lives here and nowhere else: adapters, loading, packaged models."""

from .base import Adapter, Attention, AttentionPaths, HeadLayout, Site
from .families import ADAPTERS, adapter_class_for, supported_model_types
from .loading import Loaded, build_adapter, check_source, load_config, load_model, model_identity, skeleton

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Attention",
    "AttentionPaths",
    "HeadLayout",
    "Loaded",
    "Site",
    "adapter_class_for",
    "build_adapter",
    "check_source",
    "load_config",
    "load_model",
    "model_identity",
    "skeleton",
    "supported_model_types",
]
