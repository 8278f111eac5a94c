"""The one base class of the errors a user can cause, and how entry points report them.

Every error that bad input, a bad flag, a broken file or a failing run can raise
derives from ``MegatronExtError``; its message names the file, line, flag or tensor.
Entry points catch this one class (``report``) and print one line with no traceback;
anything else is a bug and keeps its traceback. ``exit_code`` tells the shell what
kind of failure it was: 2 for bad input found before any work (Megatron's flag
errors), 1 for a failure while working (a broken checkpoint, a NaN loss).

Subclasses also derive from the builtin they replace (``ValueError`` mostly), so
``except ValueError`` in user code keeps working. This module imports nothing
heavy: the data layer uses it without torch.
"""
from __future__ import annotations

import sys


class MegatronExtError(Exception):
    """A failure the user can fix; the message says what and where."""

    exit_code = 2


class InputError(MegatronExtError, ValueError):
    """Bad input: a flag, a file, a dataset, a configuration (exit status 2)."""


class RunError(MegatronExtError, RuntimeError):
    """A failure during the work itself: a broken checkpoint, a non-finite loss (exit status 1)."""

    exit_code = 1


def report(error: MegatronExtError, prog: str) -> int:
    """Print ``prog: error: <message>`` to stderr and return the exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code
