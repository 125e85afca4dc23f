"""Checkpoint files that survive kills: atomic writes, stale-temp cleanup, and finding the
newest readable checkpoint to resume from (``ckpt_path=auto``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the destination folder, flush + fsync, then rename over
    ``path``: readers see the old complete file or the new complete file, never a partial one
    (a rename within one folder never crosses filesystems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_torch_save` (``last.ckpt`` is replaced only
    by a complete file; Lightning's own save stages the file in the system temp folder, which
    becomes a copy when that folder is on another filesystem)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)


def clean_stale_temp(folder: str | Path) -> list[Path]:
    """Remove the temp files a killed save left in ``folder``; returns what was removed."""
    folder = Path(folder)
    removed = [p for p in folder.glob(f".*{TEMP_MARK}*") if p.is_file()] if folder.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
        log.warning("removed %s (a checkpoint write that was interrupted)", p)
    return removed


def readable_checkpoint(path: Path, kind: str | None = None) -> str | None:
    """None when ``path`` is a complete cmexp training checkpoint (of ``kind``), else why not."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is skipped and named
        return f"unreadable ({type(err).__name__})"
    meta = ckpt.get("cmexp") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ckpt or "optimizer_states" not in ckpt:
        return "not a full cmexp training checkpoint"
    if kind is not None and meta.get("kind") != kind:
        return f"holds a '{meta.get('kind')}' model, this run trains '{kind}'"
    return None


def find_resume_checkpoint(folders: list[Path], kind: str | None = None) -> Path | None:
    """The newest (by modification time) readable training checkpoint in the ``checkpoints/``
    folders of ``folders``, in order: the first folder that has one wins. Unreadable files
    are skipped with a warning naming them."""
    for folder in folders:
        ckpt_dir = folder / "checkpoints"
        clean_stale_temp(ckpt_dir)
        files = (
            sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
            if ckpt_dir.is_dir()
            else []
        )
        for path in files:
            why = readable_checkpoint(path, kind)
            if why is None:
                return path
            log.warning("skipping %s: %s", path, why)
    return None


def check_resume_checkpoint(
    path: str | Path, model: torch.nn.Module, key: str = "ckpt_path"
) -> None:
    """The checkpoint a training resumes from is a full cmexp training checkpoint of the same
    kind and architecture as ``model`` (Lightning would otherwise fail half-way through
    restoring it); a :class:`~cmexp.utils.checks.ConfigError` naming ``key``, the file, what
    it holds and what was expected."""
    from cmexp.utils.checks import ConfigError

    kind = getattr(model, "kind", None)
    full = "a full training checkpoint (<run>/checkpoints/last.ckpt of a cmexp.train run)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(
            f"{key}={path} is not a readable PyTorch checkpoint ({type(err).__name__}); "
            f"expected {full}"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(
            f"{key}={path} is not a Lightning training checkpoint (no state_dict); expected {full}"
        )
    meta = ckpt.get("cmexp")
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ConfigError(
            f"{key}={path} is a checkpoint not written by cmexp.train (no 'cmexp' entry); expected {full}"
        )
    if "optimizer_states" not in ckpt:
        raise ConfigError(
            f"{key}={path} is a slim '{meta['kind']}' export (weights only, no optimizer state); "
            f"resuming needs {full}"
        )
    if kind is not None and meta["kind"] != kind:
        raise ConfigError(
            f"{key}={path} holds a '{meta['kind']}' model but this run trains '{kind}'; "
            "resume with the same +experiment"
        )
    if bool(meta.get("latent")) != (getattr(model, "latent", None) is not None):
        space = ("latent", "pixel") if meta.get("latent") else ("pixel", "latent")
        raise ConfigError(
            f"{key}={path} holds a {space[0]}-space '{meta['kind']}' model but this run trains in "
            f"{space[1]} space; resume with the same latent= setting"
        )
    saved, expected = ckpt["state_dict"], model.state_dict()
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    shapes = [
        k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if missing or extra or shapes:
        parts = [f"{len(missing)} weights missing"] if missing else []
        parts += [f"{len(extra)} unexpected"] if extra else []
        parts += [f"{len(shapes)} of another shape"] if shapes else []
        if shapes:
            k = shapes[0]
            example = f"{k} {list(saved[k].shape)} in the file vs {list(expected[k].shape)} here"
        else:
            example = (missing or extra)[0]
        raise ConfigError(
            f"{key}={path} holds a '{meta['kind']}' model of another architecture than this run's net "
            f"({', '.join(parts)}; e.g. {example}); resume with the net config it was trained with"
        )
