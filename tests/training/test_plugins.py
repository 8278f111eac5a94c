"""The plug-in interface's model hook: a run's model factory and the plug-in that builds the
model compose (MaskLLM's masked linears go into the factory's model), and two plug-ins that
both build the model are refused before anything is built."""
import pytest

from megatron_ext.models.build import build_model
from megatron_ext.sparsity.model import masked_linears
from megatron_ext.sparsity.plugin import MaskLLM
from megatron_ext.training import Run, TrainerPlugin, parse_args
from megatron_ext.training.arguments import ArgsError


def test_model_factory_builds_the_mask_only_model_with_the_plugins_masked_linears(make_argv):
    calls = []

    def factory(cfg, params_dtype, **kwargs):
        calls.append(sorted(kwargs.get("linear_overrides") or {}))
        # a shape the flags cannot ask for, as the benchmark's proxy: half the FFN width
        return build_model(cfg.replace(ffn_hidden_size=cfg.ffn_hidden_size // 2), params_dtype, **kwargs)

    argv = make_argv(2, mask_only=True, N=2, M=4)
    run = Run(parse_args(argv, (MaskLLM,)), (MaskLLM,), model_factory=factory)
    try:
        assert calls == [["linear_fc1", "linear_fc2", "linear_proj", "linear_qkv"]]
        layers = dict(masked_linears(run.model))
        assert len(layers) == 4 * run.cfg.num_layers
        fc2 = next(layer for name, layer in layers.items() if name.endswith("linear_fc2"))
        assert fc2.weight.shape[1] == run.cfg.ffn_hidden_size // 2            # the factory's model
        assert run.plugin("sparsity").state is run.model.sparsity_state   # the plug-in's state is set
        trained = [n for n, p in run.model.named_parameters() if p.requires_grad]
        assert trained and all(n.endswith(".mask_logits") for n in trained)   # mask-only froze the rest
        result = run.train()
    finally:
        run.close()
    assert [r["iteration"] for r in result.history] == [1, 2]
    assert result.history[0]["tau"] == pytest.approx(4.0)


def test_model_factory_alone_builds_the_dense_model(make_argv):
    calls = []

    def factory(cfg, params_dtype, **kwargs):
        calls.append(kwargs)
        return build_model(cfg, params_dtype, **kwargs)

    run = Run(parse_args(make_argv(2), (MaskLLM,)), (MaskLLM,), model_factory=factory)
    try:
        assert calls == [{"init_method_std": run.config.model.init_method_std}]
        assert masked_linears(run.model) == []
    finally:
        run.close()


class _OtherMethod(TrainerPlugin):
    """A second method that builds its own model (e.g. quantized linears)."""

    name = "other"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument_group("other method").add_argument("--other-method", action="store_true")

    @classmethod
    def from_args(cls, args):
        return cls() if args.other_method else None

    def build_model(self, cfg, params_dtype, init_method_std, build):
        raise AssertionError("not reached: the run is refused before building")


def test_two_plugins_that_build_the_model_are_refused_naming_both(make_argv):
    plugins = (MaskLLM, _OtherMethod)
    with pytest.raises(ArgsError, match=r"sparsity \(2:4 learnable sparsity \(mask only\)\) and other "
                                        r"\(other\) both build the model"):
        Run(parse_args(make_argv(2, mask_only=True, other_method=True), plugins), plugins)
    # either one alone is fine: the refusal is about the pair
    assert not TrainerPlugin.builds_model() and MaskLLM.builds_model() and _OtherMethod.builds_model()
