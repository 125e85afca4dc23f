"""Shared command-line behaviour of the ``cmexp.*`` entry points: bad input ends with one
``error: ...`` line and exit code 2 (``HYDRA_FULL_ERROR=1`` shows the traceback instead)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def user_error(err: BaseException) -> BaseException | None:
    """The exception to report on one line, or None for a genuine bug (full traceback).

    Hydra wraps errors raised in ``_target_`` constructors in ``InstantiationException``;
    the user-facing cause (a ValueError naming a config key, a missing file) is unwrapped.
    """
    from hydra.errors import InstantiationException

    from cmexp.modules.base import NonFiniteLossError
    from cmexp.utils.checks import ConfigError

    seen = 0
    while isinstance(err, InstantiationException) and err.__cause__ is not None and seen < 5:
        err, seen = err.__cause__, seen + 1
    if isinstance(err, (ConfigError, NonFiniteLossError, FileNotFoundError, ValueError)):
        return err
    if isinstance(err, InstantiationException):
        return err
    return None


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)``; user errors become ``error: <first line>`` on stderr and exit 2."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - classified below
        user = user_error(err)
        if user is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        first = str(user).strip().splitlines()[0] if str(user).strip() else type(user).__name__
        print(f"error: {first}", file=sys.stderr)
        sys.exit(2)
