"""megatron_ext: learnable N:M (MaskLLM) sparsity for LLaMA models on megatron-core."""
from megatron_ext.console import quiet_third_party_warnings

__version__ = "0.1.0"

quiet_third_party_warnings()
