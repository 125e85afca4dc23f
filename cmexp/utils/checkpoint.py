"""Rebuild a trained model from a cmexp checkpoint (for sampling, editing and evaluation).

A cmexp ``.ckpt`` is self-describing: ``checkpoint["cmexp"]`` holds the kind ("edm", "cd",
"ct"), the preconditioning constants and the resolved run config, whose ``net`` entry
rebuilds the raw network. No Lightning module or training data is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmexp.diffusion.precond import CMPrecond, EDMPrecond


@dataclass
class LoadedModel:
    """``model``: an :class:`EDMPrecond` denoiser (kind "edm") or a :class:`CMPrecond`
    consistency function (kinds "cd"/"ct"), in eval mode, without gradients.
    ``config``: the run's resolved config (dict). ``meta``: ``checkpoint["cmexp"]``."""

    model: nn.Module
    kind: str
    meta: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def is_consistency(self) -> bool:
        return self.kind in ("cd", "ct")

    def model_config(self, key: str, default: Any = None) -> Any:
        return (self.config.get("model") or {}).get(key, default)


def pick_device(name: str) -> str:
    """``device`` config value: "auto" = cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_consistency_model(cfg: Any, purpose: str) -> tuple[LoadedModel, str]:
    """The CD/CT checkpoint of a command line (``cfg.ckpt``, ``cfg.use_ema``, ``cfg.device``)
    and the device it is on; one clear error for a missing ``ckpt`` or an EDM teacher."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ValueError("ckpt is required: ckpt=/path/to/last.ckpt of a CD or CT run")
    device = pick_device(cfg.device)
    loaded = load_model(cfg.ckpt, use_ema=cfg.use_ema, device=device)
    if not loaded.is_consistency:
        raise ValueError(f"ckpt={cfg.ckpt} is an EDM teacher; {purpose} needs a CD or CT checkpoint")
    return loaded, device


def load_model(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu", key: str = "ckpt") -> LoadedModel:
    """Load the sampling-EMA (``use_ema``) or online weights of a cmexp checkpoint.

    Args:
        path: a ``.ckpt`` written by ``python -m cmexp.train``.
        key: the config key that named ``path`` (used in error messages).
    """
    from hydra.utils import instantiate

    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={path}: no such checkpoint file")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise ValueError(f"{key}={path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    meta = ckpt.get("cmexp") if isinstance(ckpt, dict) else None
    if not meta or meta.get("kind") not in ("edm", "cd", "ct"):
        raise ValueError(f"{key}={path} is not a checkpoint written by cmexp.train (no 'cmexp' entry with a kind)")
    record = meta.get("config") or {}
    config = record.get("config", record) if isinstance(record, dict) else {}
    if "net" not in config:
        raise ValueError(f"{key}={path} does not record its net config (checkpoint['cmexp']['config']['net'])")
    net = instantiate(config["net"])
    wrapper = EDMPrecond if meta["kind"] == "edm" else CMPrecond
    model = wrapper(net, meta["sigma_min"], meta["sigma_max"], meta["sigma_data"], meta["c_noise_scale"])
    prefix = "ema." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.requires_grad_(False).eval().to(device)
    return LoadedModel(model=model, kind=str(meta["kind"]), meta=dict(meta), config=config, path=str(file))


def export_weights(src: str | Path, dst: str | Path, use_ema: bool = True) -> Path:
    """Write a slim copy of a cmexp checkpoint holding only the sampling-EMA (or online)
    weights and the ``cmexp`` metadata: what sampling, editing and evaluation need (a
    fraction of the size of a full checkpoint with target net, optimizer and RNG states).
    Refuses to overwrite an existing file."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists():
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    meta = ckpt.get("cmexp") if isinstance(ckpt, dict) else None
    if not meta:
        raise ValueError(f"{src} is not a checkpoint written by cmexp.train")
    prefix = "ema." if use_ema else "model."
    state = {"ema." + k[len(prefix):]: v.clone() for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    meta = {k: v for k, v in meta.items() if k != "rng"}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "cmexp": meta, "global_step": ckpt.get("global_step")}, dst)
    return dst
