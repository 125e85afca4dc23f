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


#: Config keys renamed by the inference-side cleanup, per entry point: the old key on a
#: command line is an error that names the new one (Hydra would only say "not in struct").
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "train": {
        "model.sample_sigmas": "model.taus",
        "dataset.num_samples": "dataset.length",
        "preset": "removed: the main job is +experiment=fmnist_ct_pseudo_huber (chosen when no +experiment is given)",
    },
    "sample": {"grid_num_scales": "num_scales"},
    "eval": {"grid_num_scales": "num_scales"},
    "tau_search": {"grid_num_scales": "num_scales"},
    "edit": {"num_images": "num_samples", "split": "real_split", "lpips_weights_path": "metric.weights_path"},
}


def override_key(arg: str) -> str:
    """The config key of a command-line override (``+a.b=1``, ``~a.b``, ``a/b=c`` -> ``a.b``)."""
    return arg.lstrip("+~").split("=", 1)[0].replace("/", ".")


def reject_renamed_keys(entry: str, argv: list[str] | None = None) -> None:
    """Exit with code 2 and one line naming the new key when an override uses a renamed key."""
    renamed = RENAMED_KEYS.get(entry, {})
    for arg in (sys.argv[1:] if argv is None else argv):
        if arg.startswith("-"):
            continue
        key = override_key(arg)
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                hint = f"was {new}" if new.startswith("removed:") else f"was renamed: use {new}"
                print(f"error: {old} {hint}", file=sys.stderr)
                sys.exit(2)


def list_or_none(value: Any, key: str) -> list[Any] | None:
    """A list-valued command-line key (``taus``, ``tau_indices``) as a plain list of numbers;
    a ValueError naming ``key`` for anything else but null."""
    if value is None:
        return None
    from omegaconf import ListConfig, OmegaConf

    items = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    if not isinstance(items, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise ValueError(f"{key} must be a list of numbers such as [0.585], or null; got {value!r}")
    return list(items)
