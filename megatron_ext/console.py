"""A quiet console: known third-party warnings that say nothing about the run are filtered.

On a machine without TransformerEngine or Apex (every CPU run, and GPU runs that use our
SDPA attention), megatron-core warns at import, in several modules and once per
process, that it falls back to its local implementations; torch adds a few
deprecation notes about APIs megatron-core calls. Those lines bury a run's own
output, so ``quiet_third_party_warnings()`` (run once when ``megatron_ext`` is imported)
filters exactly these messages and nothing else. ``MEGATRON_EXT_SHOW_WARNINGS=1`` turns
the filter off. No torch import here: the data layer imports this package too.
"""
from __future__ import annotations

import builtins
import os
import warnings

# (message regex, category name): warnings known to carry no information for our runs
KNOWN_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", "UserWarning"),
    (r"Apex is not installed", "UserWarning"),
    (r".*TransformerEngine.*not installed", "UserWarning"),
    (r"torch\.distributed\._shard", "DeprecationWarning"),
    (r".*torch\.cuda\.amp\.(custom_fwd|custom_bwd).*deprecated", "FutureWarning"),
    (r"`torch\.cuda\.amp\.(custom_fwd|custom_bwd).*deprecated", "FutureWarning"),
    (r".*Please use the new API settings to control TF32", "UserWarning"),
    (r"`torch\.jit\.script_method` is deprecated", "DeprecationWarning"),
    (r"`torch\.jit\.script` is deprecated", "DeprecationWarning"),
    (r"The following imports from `dynamic_context\.py` will be removed", "DeprecationWarning"),
    (r"full scope is deprecated", "UserWarning"),
    (r"MLP requires ffn_hidden_size", "DeprecationWarning"),
    (r"Warning: tp_group is None", "DeprecationWarning"),
)
_installed = False


def quiet_third_party_warnings() -> None:
    """Install the filters once per process (unless ``MEGATRON_EXT_SHOW_WARNINGS=1``)."""
    global _installed
    if _installed or os.environ.get("MEGATRON_EXT_SHOW_WARNINGS", "0") == "1":
        return
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category))
    _installed = True
