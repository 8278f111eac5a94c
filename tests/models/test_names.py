"""Names written once: the mask-key suffixes live in ``checkpoint/layout.py`` and the layer's
linear slots (and their module paths) in ``models/config.py`` (which needs neither torch nor
megatron-core, so checkpoint code and the inference package can read them); every other module
imports them.
A module-level constant that spells one of them again (a tuple of paths, a regex over state-dict
keys) is a second definition."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_ext"
# a mask key suffix, or any string naming a linear slot (a module path, a regex over keys)
NAMES = re.compile(r"^\.?(mask_logits|hard_mask)$|linear_(qkv|proj|fc1|fc2)")
HOMES = {"checkpoint/layout.py", "models/config.py"}


def _definitions(path: Path) -> list[tuple[int, str]]:
    """``(line, string)`` of each name spelled in a module-level assignment, other than as a
    subscript key (``LINEAR_PATHS["linear_qkv"]`` looks a name up; it does not define one)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        keys = {id(n.slice) for n in ast.walk(node.value) if isinstance(n, ast.Subscript)}
        found += [(c.lineno, c.value) for c in ast.walk(node.value)
                  if isinstance(c, ast.Constant) and isinstance(c.value, str) and NAMES.search(c.value)
                  and id(c) not in keys]
    return found


def test_mask_suffixes_and_layer_slots_are_defined_once():
    elsewhere = {f"{p.relative_to(PACKAGE)}:{line} {name!r}" for p in sorted(PACKAGE.rglob("*.py"))
                 if str(p.relative_to(PACKAGE)) not in HOMES for line, name in _definitions(p)}
    assert not elsewhere, f"defined again outside {sorted(HOMES)}: {sorted(elsewhere)}"
    homes = {str(p.relative_to(PACKAGE)): {n for _, n in _definitions(p)} for p in (PACKAGE / h for h in HOMES)}
    assert {"mask_logits", "hard_mask"} <= homes["checkpoint/layout.py"]
    assert {"linear_qkv", "self_attention.linear_qkv", "mlp.linear_fc2"} <= homes["models/config.py"]


def test_the_one_definitions_are_what_the_modules_use():
    from megatron_ext.checkpoint import HARD_MASK_SUFFIX, LOGITS_SUFFIX, MASK_SUFFIXES
    from megatron_ext.checkpoint.resharding import _rule
    from megatron_ext.models.spec import LINEAR_NAMES, LINEAR_PATHS
    from megatron_ext.sparsity import export, masks, model, oneshot

    assert (LOGITS_SUFFIX, HARD_MASK_SUFFIX) == (".mask_logits", ".hard_mask")
    assert model.LOGITS_SUFFIX == masks.LOGITS_SUFFIX == LOGITS_SUFFIX and set(MASK_SUFFIXES) == {
        LOGITS_SUFFIX, HARD_MASK_SUFFIX}
    assert tuple(model.MASKED_SLOTS) == LINEAR_NAMES == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert oneshot.MASKED_LINEARS == tuple(LINEAR_PATHS.values())
    assert oneshot.ROW_PARALLEL == ("self_attention.linear_proj", "mlp.linear_fc2")
    assert [_rule(f"decoder.layers.7.{p}{LOGITS_SUFFIX}") for p in LINEAR_PATHS.values()] == [
        "column", "row", "gated", "row"]
    assert all(export.MCORE_MASKED.match(f"decoder.layers.3.{p}.weight") for p in LINEAR_PATHS.values())
    assert not export.MCORE_MASKED.match("decoder.layers.3.mlp.linear_fc1.hard_mask")
