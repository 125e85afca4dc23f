"""Checkpoints of other code bases, read in memory as cmexp checkpoints (nothing is written
next to them): NVlabs/edm network pickles (:mod:`cmexp.interop.edm`, read without running the
code they embed: :mod:`cmexp.interop.safe_pickle`), openai/consistency_models ``.pt`` files
(:mod:`cmexp.interop.openai`) and openai/consistency_models_cifar10 Flax msgpack checkpoints
(:mod:`cmexp.interop.flax_cifar10`, read without JAX). ``read_checkpoint`` calls :func:`read_foreign` /
:func:`adapt_foreign`; every ``ckpt=`` and ``model.teacher_path=`` therefore accepts them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cmexp.interop.edm import SUPPORTED as EDM_SUPPORTED
from cmexp.interop.edm import Converted
from cmexp.interop.flax_cifar10 import SUPPORTED as FLAX_SUPPORTED
from cmexp.interop.openai import SUPPORTED as OPENAI_SUPPORTED
from cmexp.interop.safe_pickle import UnsafePickleError, UnsupportedPickleError, is_plain_pickle

log = logging.getLogger(__name__)

SUPPORTED = f"{EDM_SUPPORTED}; {OPENAI_SUPPORTED}; {FLAX_SUPPORTED}"

#: Dataset configs (``conf/dataset/NAME.yaml``) recorded for foreign models of a known dataset.
_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "dataset"


def dataset_config(name: str) -> dict[str, Any] | None:
    """``conf/dataset/NAME.yaml`` resolved with ``data_dir = $CMEXP_ROOT/data`` (else
    ``./data``) and seed 0, or None when there is no such config."""
    from omegaconf import OmegaConf

    file = _CONF_DIR / f"{name}.yaml"
    if not file.is_file():
        return None
    root = os.environ.get("CMEXP_ROOT", os.getcwd())
    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(Path(root) / "data")},
            "seed": 0,
            "dataset": OmegaConf.load(file),
        }
    )
    out = OmegaConf.to_container(cfg.dataset, resolve=True)
    if isinstance(out, dict) and out.get("data_dir") == "???":  # a folder only the user can name
        out["data_dir"] = None
    return out  # type: ignore[return-value]


def as_checkpoint(
    converted: Converted, dataset: str | None = None, online: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A converted model in the layout of a cmexp checkpoint: ``{"cmexp": meta, "state_dict"}``
    with the weights under ``ema.net.`` and ``model.net.`` (the same tensors unless the file
    also holds ``online`` weights: those go under ``model.net.``, selected by ``use_ema=false``)."""
    config = dict(converted.config)
    ds = dataset_config(dataset) if dataset else None
    if ds is not None:
        config["dataset"] = ds
    meta = {**converted.meta, "config": {"config": config}}
    state = {}
    for prefix, weights in (("ema.net.", converted.weights), ("model.net.", online)):
        state.update({prefix + k: v for k, v in (weights or converted.weights).items()})
    for note in converted.notes:
        log.info("%s", note)
    return {"cmexp": meta, "state_dict": state, "global_step": None}


def _named(err: Exception, key: str, source: str) -> ValueError:
    if isinstance(err, UnsafePickleError):
        return ValueError(f"{key}={source} was refused: {err}")
    return ValueError(f"{key}={source} is not supported: {err}; supported: {SUPPORTED}")


def read_foreign(file: Path, key: str, source: str) -> dict[str, Any] | None:
    """An NVlabs/edm pickle or an openai/consistency_models_cifar10 Flax msgpack state as a cmexp
    checkpoint dict, or None when ``file`` is neither (a ``torch.save`` file: read it with torch
    and pass it to :func:`adapt_foreign`)."""
    from cmexp.interop.flax_cifar10 import looks_like_flax

    if looks_like_flax(file):
        from cmexp.interop.flax_cifar10 import convert_flax_cifar10

        try:
            converted, online = convert_flax_cifar10(file)
        except UnsupportedPickleError as err:
            raise _named(err, key, source) from None
        return as_checkpoint(converted, "cifar10", online)
    if not is_plain_pickle(file):
        return None
    from cmexp.interop.edm import read_edm_pickle

    try:
        converted = read_edm_pickle(file)
    except (UnsafePickleError, UnsupportedPickleError) as err:
        raise _named(err, key, source) from None
    name = file.name.lower()
    return as_checkpoint(converted, "cifar10" if "cifar10" in name else None)


def adapt_foreign(file: Path, loaded: Any, key: str, source: str) -> Any:
    """A ``torch.load``-ed openai/consistency_models state dict as a cmexp checkpoint dict;
    anything else is returned unchanged."""
    from cmexp.interop.openai import convert_openai, looks_like_openai

    if not looks_like_openai(loaded):
        return loaded
    try:
        converted = convert_openai(file, loaded)
    except UnsupportedPickleError as err:
        raise _named(err, key, source) from None
    name = file.name.lower()
    return as_checkpoint(converted, "imagenet64" if "imagenet64" in name else None)


__all__ = ["SUPPORTED", "adapt_foreign", "as_checkpoint", "dataset_config", "read_foreign"]
