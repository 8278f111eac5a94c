"""LLaMA models on megatron-core: named configurations, our layer spec, model building.

``config`` needs neither torch nor megatron-core; ``build_model`` and the spec import
them lazily so checkpoint metadata can be handled without the training stack.
"""
from megatron_ext.models.config import ConfigError, LlamaConfig, config_names, get_config

__all__ = ["ConfigError", "LlamaConfig", "config_names", "get_config", "build_model", "llama_layer_spec"]


def __getattr__(name):
    if name == "build_model":
        from megatron_ext.models.build import build_model
        return build_model
    if name == "llama_layer_spec":
        from megatron_ext.models.spec import llama_layer_spec
        return llama_layer_spec
    raise AttributeError(f"module 'megatron_ext.models' has no attribute {name!r}")
