"""Run folders: a command writes only into a folder of its own.

- :func:`check_run_folder` refuses a ``hydra.run.dir`` that already holds another run's files
  (checked before Hydra writes its ``.hydra/*.yaml`` there); a training may continue in its
  own folder when it resumes (``ckpt_path=...``).
- :func:`lock_run_folder`: a training holds an exclusive ``fcntl.flock`` on ``<run>/.lock``
  while it uses the folder, so a second training on the same folder fails at once. The kernel
  drops the lock when the process ends, however it ends: a crash leaves no stale lock.
- :func:`discard_failed_run`: a command that stops on bad input removes the folder Hydra made
  for it when nothing but Hydra's bookkeeping was written there.

No torch here: this runs on the command line before the job starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cmexp.utils.checks import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

#: What Hydra (and the lock) put in a run folder before the command writes anything.
BOOKKEEPING = (".hydra", LOCK_NAME)

#: Held locks of this process: resolved folder -> open file descriptor.
_HELD: dict[str, int] = {}

#: The run folder this process planned before Hydra made it (set by ``cli.precheck``):
#: ``{"dir": Path, "created": Path | None}`` (``created``: the top folder that did not exist).
_PLANNED: dict[str, Any] = {}


def global_rank_from_env() -> int:
    """This process's rank as the launchers set it (0 for a single process)."""
    for var in (
        "RANK",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "JSM_NAMESPACE_RANK",
        "NODE_RANK",
        "GROUP_RANK",
    ):
        value = os.environ.get(var)
        if value and value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING or name.endswith(".log") or name.startswith(".pl_hydra")


def folder_owner(path: Path) -> str | None:
    """The command that made a run folder: Hydra's job name in ``.hydra/hydra.yaml``
    ("train", "sample", ...), else "train" for a training folder written in-process."""
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        try:
            import yaml

            name = (
                ((yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra") or {})
                .get("job", {})
                .get("name")
            )
            if name:
                return "train" if str(name).startswith("train_ddp_process_") else str(name)
        except Exception:  # noqa: BLE001, S110 - an unreadable file says nothing about the owner
            pass
    if (path / "config_resolved.yaml").is_file() or (path / "checkpoints").is_dir():
        return "train"
    return None


def is_locked(path: Path) -> bool:
    """Whether another process holds the run folder's lock."""
    lock = Path(path) / LOCK_NAME
    if fcntl is None or not lock.is_file() or _key(path) in _HELD:
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _key(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


def _in_use(path: Path) -> ConfigError:
    return ConfigError(
        f"hydra.run.dir={path} is in use by another training (it holds the lock {Path(path) / LOCK_NAME}); "
        "wait for it to end or use another folder"
    )


def check_run_folder(path: Path, entry: str, resuming: bool = False) -> None:
    """Refuse a run folder that another command uses or has written into.

    ``entry`` is the command ("train", "sample", ...); a training that resumes
    (``resuming``) may continue in a training folder that is not in use.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"hydra.run.dir={path} is a file; expected a new run folder")
    if not path.is_dir():
        return
    if is_locked(path):
        raise _in_use(path)
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    owner = folder_owner(path)
    if entry == "train" and resuming and owner == "train":
        return
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    what = f"a {owner} run" if owner else "files"
    hint = (
        " (or pass ckpt_path=... to resume the training in it)"
        if entry == "train" and owner == "train"
        else ""
    )
    raise ConfigError(
        f"hydra.run.dir={path} already holds {what} ({shown}); refusing to write into it: "
        f"use a new folder or leave hydra.run.dir out{hint}"
    )


def lock_run_folder(path: Path) -> bool:
    """Take the exclusive lock of a run folder (made if needed) for this process; a
    :class:`ConfigError` naming the folder when another process holds it. Returns False when
    this process already held it (then :func:`release_run_folder` is for the first taker)."""
    if fcntl is None:
        return False
    key = _key(path)
    if key in _HELD:
        return False
    Path(path).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(path) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise _in_use(Path(path)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd
    return True


def release_run_folder(path: Path) -> None:
    """Drop this process's lock of the folder (the lock file itself stays: harmless)."""
    fd = _HELD.pop(_key(path), None)
    if fd is not None and fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def plan_run_folder(path: Path) -> None:
    """Remember, before Hydra makes it, which part of the run folder's path exists (and whether
    the folder is empty), so a command that fails on bad input can remove what was made for it."""
    path = Path(path).expanduser().absolute()
    base = path
    while not base.exists():
        base = base.parent
    _PLANNED.clear()
    _PLANNED.update(
        {"dir": path, "base": base, "empty": path.is_dir() and not any(path.iterdir())}
    )


def forget_plan() -> None:
    _PLANNED.clear()


def _job_folder() -> Path | None:
    """The run folder Hydra made for this job (its ``${now:...}`` differs from the precheck's)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            out = HydraConfig.get().runtime.output_dir
            if out:
                return Path(str(out)).absolute()
    except Exception:  # noqa: BLE001, S110 - no Hydra job: the planned folder
        pass
    return _PLANNED.get("dir")


def discard_failed_run() -> Path | None:
    """After a bad-input error: remove what was made for the run since the precheck, when
    nothing but Hydra's bookkeeping (``.hydra``, ``*.log``, the lock) is there: the run folder
    and its new parent folders, or, in a folder that existed empty, the bookkeeping files.
    Returns the folder cleaned, if any."""
    if not _PLANNED:
        return None
    base, folder = _PLANNED["base"], _job_folder()
    was_empty, planned = _PLANNED["empty"], _PLANNED["dir"]
    _PLANNED.clear()
    if folder is None or not folder.is_dir() or (folder != base and base not in folder.parents):
        return None
    if any(not is_bookkeeping(p.name) for p in folder.iterdir()) or is_locked(folder):
        return None
    release_run_folder(folder)
    if folder == base:  # it existed before the command: empty it again if it was empty
        if not (was_empty and folder == planned):
            return None
        for p in folder.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    p = folder.parent
    while p != base and base in p.parents and p.is_dir() and not any(p.iterdir()):
        p.rmdir()
        p = p.parent
    return folder
