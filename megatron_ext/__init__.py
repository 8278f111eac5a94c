"""megatron_ext: learnable N:M (MaskLLM) sparsity for LLaMA models on megatron-core."""
__version__ = "0.1.0"
