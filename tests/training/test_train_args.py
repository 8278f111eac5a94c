"""Command-line flags: Megatron-LM / MaskLLM command lines parse, bad or conflicting ones fail
at start with a message naming the flag."""
import pytest

from megatron_ext.train import pretrain
from megatron_ext.train import PLUGINS, parse_args
from megatron_ext.training.arguments import ArgsError
from megatron_ext.training.config import RunConfig
from megatron_ext.training.plugins import build_plugins
from megatron_ext.training.setup import resolve_model_config as _resolve_model_config
from megatron_ext.training.data import DataError

# A MaskLLM-style mask-only launch (flags as in its llama2-7b script), pointed at our sample.
MASKLLM_FLAGS = (
    "--untie-embeddings-and-output-weights --disable-bias-linear --no-position-embedding "
    "--use-rotary-position-embeddings --no-masked-softmax-fusion --swiglu --adam-eps 1e-5 "
    "--attention-dropout 0.0 --hidden-dropout 0.0 --no-rope-fusion --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 1 --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
    "--seq-length 64 --max-position-embeddings 64 --make-vocab-size-divisible-by 1 --ffn-hidden-size 128 "
    "--normalization RMSNorm --micro-batch-size 1 --global-batch-size 4 --train-iters 10 --lr 5e-5 "
    "--min-lr 5e-6 --lr-decay-style cosine --log-interval 10 --eval-iters 10 --eval-interval 100 "
    "--tokenizer-type Llama2Tokenizer --save-interval 500 --split 98,2,0 --clip-grad 1.0 --weight-decay 0.1 "
    "--adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.014 --log-num-zeros-in-grad --lr-warmup-iters 0 "
    "--exit-on-missing-checkpoint --no-gradient-accumulation-fusion --no-async-tensor-model-parallel-allreduce "
    "--use-flash-attn --bf16 --log-diff-mask --exit-signal-handler --exp-name llama-tiny-mask-only "
    "--no-load-optim --no-load-rng --finetune --enable-partial-load "
    "--gumbel-scale-range 1e2 5e2 --gumbel-temperature-range 4 0.05 --N 2 --M 4 --mask-only "
    "--lr-mult 10 --weight-reg 1e-5"
).split()


def test_maskllm_command_line_parses(shakespeare_prefix, sample_tokenizer, tmp_path):
    argv = MASKLLM_FLAGS + ["--data-path", shakespeare_prefix, "--tokenizer-model", str(sample_tokenizer),
                            "--load", str(tmp_path / "oneshot"), "--save", str(tmp_path / "ckpt")]
    args = parse_args(argv)
    assert args.mask_only and args.sparse and (args.N, args.M) == (2, 4) and args.hard is False
    assert args.gumbel_temperature_range == (4.0, 0.05) and args.gumbel_scale_range == (100.0, 500.0)
    assert args.tag == "llama-tiny-mask-only" and args.bf16 and args.finetune and args.lr_mult == 10.0
    run = RunConfig.from_args(args, world_size=4)
    assert (run.parallel.data_parallel_size, run.optim.num_microbatches) == (4, 1)


def test_aliases_and_defaults(make_argv):
    args = parse_args(make_argv(sparsity_n=1, sparsity_m=4))
    assert (args.N, args.M) == (1, 4) and args.sparse and not args.mask_only
    assert args.weight_reg == 0.0 and args.lr_mult == 1.0 and args.gumbel_temperature_range == (4.0, 0.05)
    args = parse_args(make_argv(mask_only=True))
    assert (args.N, args.M) == (2, 4)
    dense = parse_args(make_argv())
    assert not dense.sparse and dense.tag == "run"
    assert RunConfig.from_args(dense, world_size=2).optim.num_microbatches == 1


@pytest.mark.parametrize("flags, message", [
    ({"not_a_flag": 3}, "unrecognized arguments: --not-a-flag"),
    ({"lr_decay_style": "exponential"}, "--lr-decay-style: invalid choice"),
    ({"prior_strength": 3.0, "mask_only": True}, "--prior-strength needs --prior-mask"),
    ({"prior_mask": "x", "mask_only": True}, "--prior-mask needs --prior-strength"),
    ({"weight_reg": 1e-5}, "--weight-reg applies to learnable sparsity"),
    ({"hard": True}, "--hard applies to learnable sparsity"),
    ({"N": 4, "M": 4}, "--N 4 must be smaller than --M 4"),
    ({"fp16": True}, "--fp16 is not supported"),
    ({"pipeline_model_parallel_size": 2}, "--pipeline-model-parallel-size 2"),
    ({"min_lr": 1.0}, "--min-lr 1.0 is larger than --lr"),
    ({"lr_warmup_iters": 4}, "--lr-warmup-iters 4 must be smaller"),
    ({"save_interval": 2}, "--save-interval needs --save"),
    ({"keep_last": 2}, "--keep-last needs --save"),
    ({"finetune": True}, "--finetune needs --load"),
    ({"micro_batch_size": 0}, "--micro-batch-size must be > 0"),
    ({"hidden_dropout": 0.1}, "no dropout"),
    ({"lr": None}, "--lr is required"),
    ({"data_path": None}, "--data-path is required"),          # the trainer's; plot_schedule needs no data
    ({"tokenizer_model": None}, "--tokenizer-model is required"),
    ({"eval_data_path": ["domain=0.5", "a", "0.5", "b"]}, "a named set is one prefix (NAME=PREFIX), not a blend"),
    ({"eval_data_path": ["domain=0.5"]}, "0.5 is a blend weight, but a named set is one prefix"),
    ({"eval_data_path": ["valid=x"]}, "the name 'valid' is reserved"),
    ({"gumbel_temperature_range": [4, 0], "mask_only": True}, "--gumbel-temperature-range values"),
    ({"use_checkpoint_opt_param_scheduler": True, "override_opt_param_scheduler": True}, "mutually exclusive"),
    ({"tag": "a/b"}, "--tag"),
])
def test_bad_flags_fail_naming_the_flag(make_argv, flags, message):
    with pytest.raises(ArgsError) as e:
        parse_args(make_argv(**flags))
    assert message in str(e.value)


def test_global_batch_must_divide_by_micro_batch_times_dp(make_argv):
    args = parse_args(make_argv(global_batch_size=6, micro_batch_size=2))
    assert RunConfig.from_args(args, world_size=1).optim.num_microbatches == 3
    args = parse_args(make_argv(global_batch_size=6, micro_batch_size=2))
    with pytest.raises(ArgsError, match=r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x "
                                        r"data-parallel size 2"):
        RunConfig.from_args(args, world_size=2)
    args = parse_args(make_argv(tensor_model_parallel_size=4))
    with pytest.raises(ArgsError, match="--tensor-model-parallel-size 4 does not divide the number of processes 6"):
        RunConfig.from_args(args, world_size=6)


def resolve_model_config(args, tok, ckpt):
    """The model configuration the trainer would resolve for these flags."""
    tp = args.tensor_model_parallel_size
    return _resolve_model_config(RunConfig.from_args(args, world_size=tp).model, tok, ckpt,
                                 seq_length=args.seq_length, tp=tp, plugins=build_plugins(PLUGINS, args))


def test_megatron_rope_scaling_flags_give_llama31_scaling(make_argv):
    """Megatron-LM's --use-rope-scaling (factor 8 by default) and --rope-scaling-factor set the
    model's rotary scaling; the factor alone is refused naming the switch it needs."""
    from megatron_ext.data.tokenizers import build_tokenizer

    def cfg(**flags):
        args = parse_args(make_argv(**flags))
        return resolve_model_config(args, build_tokenizer(args.tokenizer_type, args.tokenizer_model), None)

    assert cfg().rope_scaling_factor is None
    assert cfg(use_rope_scaling=True).rope_scaling_factor == 8.0
    assert cfg(use_rope_scaling=True, rope_scaling_factor=4.0).rope_scaling_factor == 4.0
    with pytest.raises(ArgsError, match="--rope-scaling-factor 4.0 needs --use-rope-scaling"):
        parse_args(make_argv(rope_scaling_factor=4.0))


def test_tp_must_divide_the_heads(make_argv):
    """tiny has 4 heads and 2 query groups: TP=4 cannot shard it (a world of 4 would be needed
    anyway, so this runs the check that comes first on a world of one: TP 1 ok, the model check)."""
    from megatron_ext.data.tokenizers import build_tokenizer

    args = parse_args(make_argv(tensor_model_parallel_size=4))
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    with pytest.raises(ArgsError, match="--tensor-model-parallel-size: .*tensor-parallel size 4 does not divide "
                                        "num_query_groups 2"):
        resolve_model_config(args, tok, None)
    args = parse_args(make_argv(num_attention_heads=3, mask_only=True))
    with pytest.raises(ArgsError, match="hidden_size 64 is not divisible by num_attention_heads 3"):
        resolve_model_config(args, tok, None)
    args = parse_args(make_argv(mask_only=True, M=8, N=2, hidden_size=36, num_attention_heads=4,
                                num_query_groups=4))
    with pytest.raises(ArgsError, match="--M 8: the model's hidden size = 36 is not a multiple of M"):
        resolve_model_config(args, tok, None)
    args = parse_args(make_argv(seq_length=512))
    with pytest.raises(ArgsError, match="--seq-length 512 exceeds the model's max position embeddings 256"):
        resolve_model_config(args, tok, None)


def test_model_from_megatron_flags_needs_the_llama_architecture(make_argv):
    from megatron_ext.data.tokenizers import build_tokenizer

    flags = dict(model=None, num_layers=2, hidden_size=96, num_attention_heads=4)
    args = parse_args(make_argv(**flags))
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    with pytest.raises(ArgsError, match="add --swiglu"):
        resolve_model_config(args, tok, None)
    args = parse_args(make_argv(**flags, swiglu=True, disable_bias_linear=True, normalization="RMSNorm",
                                use_rotary_position_embeddings=True, group_query_attention=True,
                                num_query_groups=2))
    cfg = resolve_model_config(args, tok, None)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups) == (2, 96, 2)
    assert cfg.ffn_hidden_size == 256 and cfg.vocab_size == tok.vocab_size == 2000
    assert cfg.max_position_embeddings == 64 and cfg.tie_word_embeddings


def test_missing_files_fail_before_training(make_argv, tmp_path):
    with pytest.raises(DataError, match=r"--data-path: .*nowhere_text_document\.(bin|idx) does not exist"):
        pretrain(make_argv(data_path=str(tmp_path / "nowhere_text_document")))
    with pytest.raises(DataError, match=r"--eval-data-path: .*held\.(bin|idx) does not exist"):
        pretrain(make_argv(eval_data_path=str(tmp_path / "held")))
    with pytest.raises(ArgsError, match="--tokenizer-model: .*not found"):
        pretrain(make_argv(tokenizer_model=str(tmp_path / "tokenizer.model")))
    with pytest.raises(ArgsError, match=r"--load .*missing: no such checkpoint directory"):
        pretrain(make_argv(load=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgsError, match="no checkpoint found .--finetune needs one"):
        pretrain(make_argv(load=str(tmp_path / "empty"), finetune=True))
    with pytest.raises(ArgsError, match="--exit-on-missing-checkpoint"):
        pretrain(make_argv(load=str(tmp_path / "empty"), exit_on_missing_checkpoint=True))
    with pytest.raises(ArgsError, match="--prior-mask .*nomask: no such checkpoint"):
        pretrain(make_argv(mask_only=True, prior_mask=str(tmp_path / "nomask"), prior_strength=3.0))


@pytest.mark.parametrize("split", ["abc", "90,5,3,2", "1,-1,0"])
def test_bad_split_fails_at_parse_time_naming_the_flag(make_argv, split):
    with pytest.raises(ArgsError, match="--split"):
        parse_args(make_argv(split=split))


def test_unwritable_outputs_fail_before_the_model_is_built(make_argv, tmp_path):
    from megatron_ext.train import pretrain

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for flag in ("save", "tensorboard_dir", "data_cache_path"):
        with pytest.raises(ArgsError, match=f"--{flag.replace('_', '-')} .*not a directory"):
            pretrain(make_argv(**{flag: str(not_a_dir)}, log_dir=str(tmp_path / "logs")))


def test_eval_data_path_help_documents_named_sets_and_blends():
    from megatron_ext.train import build_parser

    (action,) = [a for a in build_parser()._actions if "--eval-data-path" in a.option_strings]
    assert "NAME=PREFIX" in action.help and "eval_data" in action.help
    assert "A named set is one prefix, not a blend" in action.help
