"""Shared command-line behaviour of the ``cmexp.*`` entry points: bad input ends with one
``error: ...`` line and exit code 2 (``HYDRA_FULL_ERROR=1`` shows the traceback instead),
before any run folder is made or touched (:func:`precheck`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: Hydra flags that print or change the config instead of running the job: no precheck.
PASSTHROUGH_FLAGS = {
    "--cfg",
    "-c",
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--resolve",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
    "--version",
}
MULTIRUN_FLAGS = {"-m", "--multirun"}
#: Entry points that write only the files their config names (``out=``), not a run folder.
NO_RUN_FOLDER = {"export"}


def _name_target(message: str, outer: str) -> str:
    """A TypeError raised in a base class's ``__init__`` (``DiffusionLitModule.__init__() got
    an unexpected keyword argument 'x'``: a method passes its base settings through) names the
    class the config's ``_target_`` asked for instead (the method's LightningModule)."""
    import re

    target = re.search(r"Error in call to target '([\w.]+)'", outer)
    call = re.match(r"(\w+)\.__init__\(\) (.*)", message, re.S)
    if target is None or call is None:
        return message
    cls = target.group(1).rsplit(".", 1)[-1]
    return message if cls == call.group(1) else f"{cls}.__init__() {call.group(2)}"


def user_error(err: BaseException) -> BaseException | None:
    """The exception to report on one line, or None for a genuine bug (full traceback).

    Hydra wraps errors raised in ``_target_`` constructors in ``InstantiationException``;
    the user-facing cause (a ValueError naming a config key, a missing file) is unwrapped.
    """
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    from cmexp.utils.checks import ConfigError

    seen, outer = 0, err
    while isinstance(err, InstantiationException) and err.__cause__ is not None and seen < 5:
        err, seen = err.__cause__, seen + 1
    if isinstance(
        err, (ConfigError, FileNotFoundError, FileExistsError, ValueError, MissingMandatoryValue)
    ):
        return err
    if isinstance(outer, InstantiationException) and isinstance(err, TypeError):
        # a config group whose keys do not fit its class (e.g. model=classifier under a CT experiment)
        key = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in str(outer).splitlines()
                if ln.strip().startswith("full_key:")
            ),
            "",
        )
        return ConfigError(
            f"{key or 'config'}: {_name_target(str(err), str(outer))} "
            "(the config's keys do not fit its _target_)"
        )
    if isinstance(err, InstantiationException):
        return err
    if (
        type(err).__name__ == "MisconfigurationException"
    ):  # Lightning's word for a bad trainer setting
        return err
    from cmexp.utils.errors import NonFiniteLossError

    if isinstance(err, NonFiniteLossError):
        return err
    return None


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)``; user errors become ``error: <first line>`` on stderr and exit 2, and
    the run folder made for the command is removed when nothing but Hydra's bookkeeping was
    written there (:func:`cmexp.utils.runs.discard_failed_run`)."""
    try:
        return fn(*args)
    except Exception as err:
        user = user_error(err)
        if user is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from cmexp.utils.runs import discard_failed_run

        discard_failed_run()
        first = str(user).strip().splitlines()[0] if str(user).strip() else type(user).__name__
        print(f"error: {first}", file=sys.stderr)
        sys.exit(2)


#: Config keys renamed by the inference-side cleanup, per entry point: the old key on a
#: command line is an error that names the new one (Hydra would only say "not in struct").
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "train": {
        "model.sample_sigmas": "model.taus",
        # the preconditioning object (a method is one folder: model.precond built by Hydra)
        "model.sigma_min": "model.precond.sigma_min",
        "model.sigma_max": "model.precond.sigma_max",
        "model.sigma_data": "model.precond.sigma_data",
        "model.c_noise_scale": "model.precond.c_noise_scale",
        "model.edm_scalings_in_training": "model.precond.edm_scalings_in_training",
        "dataset.num_samples": "dataset.length",
        "preset": "removed: the main job is +experiment=fmnist_cd_quick (chosen when no +experiment is given)",
    },
    "sample": {"grid_num_scales": "num_scales"},
    "eval": {"grid_num_scales": "num_scales"},
    "tau_search": {"grid_num_scales": "num_scales"},
    "edit": {
        "num_images": "num_samples",
        "split": "real_split",
        "lpips_weights_path": "metric.weights_path",
    },
}


def override_key(arg: str) -> str:
    """The config key of a command-line override (``+a.b=1``, ``~a.b``, ``a/b=c`` -> ``a.b``)."""
    return arg.lstrip("+~").split("=", 1)[0].replace("/", ".")


def renamed_key_error(entry: str, argv: list[str]) -> str | None:
    """The message for the first override that uses a renamed key, naming the new key."""
    renamed = RENAMED_KEYS.get(entry, {})
    for arg in argv:
        if arg.startswith("-"):
            continue
        key = override_key(arg)
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                hint = f"was {new}" if new.startswith("removed:") else f"was renamed: use {new}"
                return f"{old} {hint}"
    return None


def reject_renamed_keys(entry: str, argv: list[str] | None = None) -> None:
    """Exit with code 2 and one line naming the new key when an override uses a renamed key."""
    message = renamed_key_error(entry, sys.argv[1:] if argv is None else argv)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def hydra_message(err: BaseException) -> str:
    """One line from Hydra's multi-line composition and override-parsing errors."""
    parts: list[str] = []
    options: list[str] = []
    for line in str(err).splitlines():
        text = line.strip()
        if not text or text.startswith("See https://hydra.cc"):
            continue
        if text.startswith("Config search path"):
            break
        if line.startswith("\t"):
            options.append(text)
            continue
        parts.append(text.rstrip("."))
    if options:
        parts[-1] = f"{parts[-1]} {', '.join(options)}"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        parts.append(str(cause).strip().splitlines()[0])
    return "; ".join(parts)


def check_sweep_options(entry: str, overrides: list[str], parsed: list[Any]) -> None:
    """A multirun (``-m``, a sweep override such as ``+experiment=a,b``): every config-group
    option it names exists, else a :class:`~cmexp.utils.checks.ConfigError` with the one line
    a single run gets ("Could not find 'sweep/x'; Available options in 'sweep': ..."). The
    first job's config is composed (each sweep override at its first value), then each other
    value of a swept group in its place; other composition errors are left to Hydra, which
    reports them per job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    from cmexp.utils.checks import ConfigError

    values: list[list[str]] = []
    try:
        for line, o in zip(overrides, parsed, strict=True):
            values.append(list(o.sweep_string_iterator()) if o.is_sweep_override() else [line])
    except Exception:  # noqa: BLE001 - a sweep Hydra's basic sweeper cannot list (interval)
        return
    if any(not v for v in values):
        return

    def line(i: int, value: str) -> str:
        o = parsed[i]
        return f"{o.get_key_element()}={value}" if o.is_sweep_override() else value

    first = [line(i, v[0]) for i, v in enumerate(values)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=entry):
        jobs = [first]
        repo = GlobalHydra.instance().config_loader().repository
        for i, o in enumerate(parsed):
            if o.is_sweep_override() and repo.group_exists(o.key_or_group):
                jobs += [[*first[:i], line(i, v), *first[i + 1 :]] for v in values[i][1:]]
        for job in jobs:
            try:
                compose(entry, overrides=job)
            except MissingConfigException as err:
                raise ConfigError(hydra_message(err)) from None
            except HydraException:
                return


def precheck(entry: str, argv: list[str] | None = None) -> Any:
    """What ``python -m cmexp.<entry>`` checks before Hydra starts the job (Hydra makes the run
    folder and writes ``.hydra/*.yaml`` there before the job runs): renamed keys, the config
    composition itself, every value (:func:`cmexp.utils.checks.check_config`), and the run
    folder (:func:`cmexp.utils.runs.check_run_folder`; a training also takes its lock). Raises
    :class:`~cmexp.utils.checks.ConfigError`; returns the composed config, or None when Hydra
    only prints the config or runs a sweep (each job is checked when it starts). No torch is
    imported, so a bad value fails in well under a second."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from cmexp.utils import runs
    from cmexp.utils.checks import ConfigError, check_config

    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    runs.forget_plan()
    message = renamed_key_error(entry, argv)
    if message:
        raise ConfigError(message)
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if flags & PASSTHROUGH_FLAGS:
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    parser, parsed = OverridesParser.create(), []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except HydraException as err:
            message = hydra_message(err)
            raise ConfigError(
                message if override in message else f"{override}: {message}"
            ) from None
    if flags & MULTIRUN_FLAGS or any(o.is_sweep_override() for o in parsed):
        check_sweep_options(entry, overrides, parsed)
        return None
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=entry):
            cfg = compose(entry, overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise ConfigError(hydra_message(err)) from None
    if "MULTIRUN" in str(cfg.hydra.get("mode")):
        return None
    HydraConfig.instance().set_config(cfg)
    check_config(entry, cfg)
    if entry in NO_RUN_FOLDER:
        return cfg
    try:
        run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).expanduser().absolute()
    except Exception:  # noqa: BLE001 - an unresolvable run dir: Hydra reports it
        return cfg
    if runs.global_rank_from_env() == 0:  # DDP ranks > 0 re-run the command in rank 0's folder
        runs.check_run_folder(
            run_dir, entry, resuming=entry == "train" and bool(cfg.get("ckpt_path"))
        )
        runs.plan_run_folder(run_dir)
        if entry == "train":
            runs.lock_run_folder(run_dir)
    if from_command_line:
        pin_run_dir(run_dir, overrides)
    return cfg


def pin_run_dir(run_dir: Path, overrides: list[str], argv: list[str] | None = None) -> None:
    """Hand Hydra the run folder the precheck resolved (``hydra.run.dir=<it>`` appended to the
    command line, ``sys.argv`` by default) unless the command line names one: Hydra composes
    the config again and would resolve ``${now:...}`` in ``hydra.run.dir`` a second time, so the
    folder the precheck checked and locked (made empty) would not be the job's."""
    if any(override_key(o) == "hydra.run.dir" for o in overrides):
        return
    text = str(run_dir).replace("'", "\\'")
    (sys.argv if argv is None else argv).append(f"hydra.run.dir='{text}'")


def list_or_none(value: Any, key: str) -> list[Any] | None:
    """A list-valued command-line key (``taus``, ``tau_indices``) as a plain list of numbers;
    a ValueError naming ``key`` for anything else but null."""
    if value is None:
        return None
    from omegaconf import ListConfig, OmegaConf

    items = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    if not isinstance(items, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in items
    ):
        raise ValueError(
            f"{key} must be a list of numbers such as [0.585], or null; got {value!r}"
        )
    return list(items)
