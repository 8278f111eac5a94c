"""Build megatron-core ``GPTModel``s for a ``LlamaConfig`` on the current tensor-parallel rank."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import platform
from megatron_ext.models.config import LLAMA31_ROPE_SCALING_FACTOR, ConfigError, LlamaConfig
from megatron_ext.models.spec import block_spec, llama_layer_spec


def _current_tp() -> int:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("model parallel state is not initialised; call megatron_ext.platform.init_distributed first")
    return parallel_state.get_tensor_model_parallel_world_size()


def transformer_config(cfg: LlamaConfig, tp_size: int, params_dtype: torch.dtype = torch.float32,
                       use_cpu_initialization: Optional[bool] = None, init_method_std: float = 0.02,
                       **overrides: Any) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for a LLaMA model (no dropout, no bias, no fusions)."""
    cfg.validate_tp(tp_size)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    if use_cpu_initialization is None:
        use_cpu_initialization = platform.use_cpu_initialization()
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(cfg: LlamaConfig, params_dtype: torch.dtype = torch.float32, *,
                linear_overrides: Optional[Mapping[str, Any]] = None,
                layer_spec: Optional[ModuleSpec] = None,
                use_cpu_initialization: Optional[bool] = None,
                parallel_output: bool = True,
                init_method_std: float = 0.02,
                config_overrides: Optional[Mapping[str, Any]] = None) -> GPTModel:
    """The LLaMA ``GPTModel`` shard of this tensor-parallel rank, on ``platform.device()``.

    Call after ``platform.init_distributed`` (and ``platform.seed_everything`` for
    reproducible weights). ``layer_spec`` defaults to ``llama_layer_spec(linear_overrides)``.
    Embedding/output rows past ``cfg.vocab_size`` (Megatron's vocabulary padding) are zero.
    With ``parallel_output=True`` the logits stay split over the vocabulary
    (see ``gather_logits``).
    """
    tp = _current_tp()
    cfg.validate_tp(tp)
    if layer_spec is not None and linear_overrides is not None:
        raise ValueError("pass either layer_spec or linear_overrides, not both")
    if layer_spec is None:
        layer_spec = llama_layer_spec(linear_overrides)
    tconfig = transformer_config(cfg, tp, params_dtype, use_cpu_initialization, init_method_std,
                                 **dict(config_overrides or {}))
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(layer_spec, cfg.num_layers),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rotary_base,
        # LLaMA-3.1's "llama3" scaling, megatron-core's own (config.LLAMA3_ROPE_SCALING)
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or LLAMA31_ROPE_SCALING_FACTOR,
    )
    model.to(platform.device())
    with torch.no_grad():  # megatron-core's torch norms ignore params_dtype
        for p in model.parameters():
            if p.dtype != params_dtype:
                p.data = p.data.to(params_dtype)
    zero_vocab_padding(model, cfg.vocab_size)
    return model


def _vocab_shard_rows(weight: torch.Tensor) -> tuple[int, int]:
    rows = weight.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * rows
    return start, start + rows


@torch.no_grad()
def zero_vocab_padding(model: GPTModel, vocab_size: int) -> None:
    """Zero this rank's embedding/output rows whose global index is ``>= vocab_size``."""
    weights = [model.embedding.word_embeddings.weight]
    if getattr(model, "output_layer", None) is not None and model.output_layer.weight is not None:
        weights.append(model.output_layer.weight)
    for w in weights:
        start, end = _vocab_shard_rows(w)
        if end > vocab_size:
            w[max(vocab_size - start, 0):].zero_()


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocabulary-parallel logits ``[..., V/tp]`` into ``[..., V]`` (no gradient path)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def forward_logits(model: GPTModel, tokens: torch.Tensor, vocab_size: Optional[int] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-vocabulary logits ``[b, s, V]`` for token ids ``[b, s]``, trimmed to ``vocab_size`` if given."""
    tokens = tokens.to(platform.device())
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = gather_logits(model(tokens, position_ids, attention_mask))
    return logits[..., :vocab_size] if vocab_size is not None else logits


def lm_loss(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor,
            loss_mask: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross entropy (vocabulary-parallel) over ``loss_mask``."""
    tokens, labels = tokens.to(platform.device()), labels.to(platform.device())
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    per_token = model(tokens, position_ids, attention_mask, labels=labels)
    if loss_mask is None:
        return per_token.float().mean()
    loss_mask = loss_mask.to(per_token.device, torch.float32)
    return (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
