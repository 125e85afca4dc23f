"""One loader for every trained model: a checkpoint (path or ``zoo:NAME``) becomes a
:class:`LoadedModel` that carries the network, its preconditioning wrapper, its kind and every
setting needed to use it. No Lightning module or training data is needed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmexp import registry
from cmexp.diffusion.precond import PRECONDS
from cmexp.inference.checkpoint import CheckpointFile, read_checkpoint
from cmexp.inference.plan import SamplingSpec

log = logging.getLogger(__name__)


def sampling_spec(meta: dict[str, Any], config: dict[str, Any] | None = None) -> SamplingSpec:
    """The :class:`SamplingSpec` written in a checkpoint's metadata; its family, default
    sampler and plan end come from the registered method of its kind. Checkpoints written
    before ``rho``/``num_scales``/``taus`` were recorded fall back to their run config (then
    to the CM paper's rho = 7, N = 18); a recorded sampler of another family (checkpoints of
    consistency models once recorded ``heun``) gives way to the method's own. The
    ``clip_denoised`` default is the checkpoint's (converted openai/consistency_models files
    record True, as their ``image_sample.py``), else the method record's, else the family's."""
    method = registry.method(str(meta["kind"]), meta.get("method_package"))
    model_cfg = (config or {}).get("model") or {}
    schedule_cfg = (config or {}).get("schedule") or {}
    rho = meta.get("rho", model_cfg.get("rho", 7.0))
    num_scales = (
        meta.get("num_scales")
        or model_cfg.get("sample_num_scales")
        or schedule_cfg.get("num_scales")
        or 18
    )
    taus = meta.get("taus", model_cfg.get("taus", model_cfg.get("sample_sigmas", ())))
    alpha_bars = meta.get("alpha_bars")
    sampler = str(meta.get("sampler") or method.sampler)
    if sampler not in registry.samplers(method.family):
        sampler = str(method.sampler)
    return SamplingSpec(
        family=str(method.family),
        sigma_min=float(meta["sigma_min"]),
        sigma_max=float(meta["sigma_max"]),
        rho=float(rho),
        num_scales=int(num_scales),
        taus=tuple(float(t) for t in taus or ()),
        sampler=sampler,
        final_zero=bool(meta.get("final_zero", method.final_zero)),
        alpha_bars=tuple(float(a) for a in alpha_bars) if alpha_bars is not None else (),
        clip_denoised=_clip_default(meta.get("clip_denoised", method.clip_denoised)),
    )


def _clip_default(value: Any) -> bool | None:
    """A recorded ``clip_denoised`` default (None: the family's)."""
    return None if value is None else bool(value)


@dataclass
class LoadedModel:
    """A trained model ready to use.

    ``model``: the preconditioned network of its method's family (a denoiser D(x, sigma) such
    as ``EDMPrecond``; a consistency function f(x, sigma) such as ``CMPrecond``), in eval
    mode, without gradients.
    ``spec``: its sampling settings (sigma range, rho, grid N, default taus).
    ``config``: the run's resolved config (dict). ``meta``: ``checkpoint["cmexp"]``.
    ``latent``: a latent model's codec (:class:`cmexp.inference.latent.LatentCodec`; None in
    pixel space): ``model`` works on latents, :func:`cmexp.inference.generate` decodes, and
    ``img_resolution``/``img_channels`` are the images' (the model's own: ``model.img_*``).
    """

    model: nn.Module
    kind: str
    spec: SamplingSpec
    meta: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    source: str = ""
    latent: nn.Module | None = None

    @property
    def family(self) -> str:
        """The sampling family (``cmexp.registry``): which samplers fit the model."""
        return self.spec.family

    @property
    def net(self) -> nn.Module:
        return self.model.net

    @property
    def sigma_data(self) -> float:
        return float(self.model.sigma_data)

    @property
    def img_resolution(self) -> int:
        """Side of the images (decoded ones for a latent model)."""
        return int((self.latent or self.model).img_resolution)

    @property
    def img_channels(self) -> int:
        return int((self.latent or self.model).img_channels)

    @property
    def label_dim(self) -> int:
        return int(self.model.label_dim)

    @property
    def dataset(self) -> dict[str, Any]:
        """The run's dataset config (the reference data of metrics and editing)."""
        return dict(self.config.get("dataset") or {})


def pick_device(name: str) -> str:
    """``device`` config value: "auto" = cuda when available, else cpu; "cuda" without a GPU
    is a ValueError naming ``device``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={name} but no CUDA device is available here; use device=cpu or device=auto"
        )
    return str(name)


def build_wrapper(net: nn.Module, meta: dict[str, Any], source: str = "ckpt") -> nn.Module:
    """The preconditioning wrapper a checkpoint's metadata describes around ``net``: the
    registered wrapper named in ``meta["precond"]`` (``cmexp.diffusion.precond.PRECONDS``:
    edm, vp, vp_sde, ve_sde, trigflow, ...), else its method's default wrapper (CD/CT:
    ``CMPrecond``). Each is rebuilt by its ``from_meta(net, meta)``."""
    method = registry.method(str(meta["kind"]), meta.get("method_package"))
    default = registry.load(method.wrapper) if method.wrapper else None  # registers its names
    name = (meta.get("precond") or {}).get("name")
    if name is not None and name not in PRECONDS:
        raise ValueError(f"{source}: unknown preconditioning {meta['precond']!r}")
    cls = PRECONDS[name] if name is not None else default
    if cls is None:
        raise ValueError(f"{source}: a '{meta['kind']}' model has no preconditioning to rebuild")
    return cls.from_meta(net, meta)


def build_model(ckpt: CheckpointFile, prefix: str = "ema.") -> nn.Module:
    """The preconditioned network of an EDM/CD/CT checkpoint with the weights under ``prefix``
    ("ema." = sampling EMA, "model." = online)."""
    from hydra.utils import instantiate

    net = instantiate(ckpt.net_config())
    m = ckpt.meta
    model = build_wrapper(net, m, f"{ckpt.key}={ckpt.source}")
    try:
        model.load_state_dict(ckpt.weights(prefix))
    except RuntimeError as err:
        raise ValueError(
            f"{ckpt.key}={ckpt.source}: its weights do not fit its recorded net config ({str(err).splitlines()[0]})"
        ) from None
    return model


def load_model(
    source: str | Path,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    key: str = "ckpt",
    kinds: tuple[str, ...] | None = None,
    purpose: str = "",
) -> LoadedModel:
    """Load the sampling-EMA (``use_ema``) or online weights of a trained model.

    Args:
        source: a ``.ckpt`` written by ``python -m cmexp.train``, its slim export, or ``zoo:NAME``.
        key: the config key that named ``source`` (used in error messages).
        kinds: the kinds accepted (None: every sampled kind; editing and the tau search:
            ``cmexp.registry.kinds("consistency")``).
        purpose: what the model is for, named in a kind mismatch ("editing needs ...").
    """
    try:
        ckpt = read_checkpoint(source, key, kinds)
    except ValueError as err:
        if purpose and "expected" in str(err):
            raise ValueError(f"{err} ({purpose})") from None
        raise
    model = build_model(ckpt, "ema." if use_ema else "model.")
    model.requires_grad_(False).eval().to(device)
    from cmexp.inference.latent import codec_from_checkpoint

    latent = codec_from_checkpoint(ckpt)
    return LoadedModel(
        model=model,
        kind=ckpt.kind,
        spec=sampling_spec(ckpt.meta, ckpt.config),
        meta=ckpt.meta,
        config=ckpt.config,
        path=str(ckpt.path),
        source=str(source),
        latent=latent.to(device) if latent is not None else None,
    )


def load_from_config(
    cfg: Any, kinds: tuple[str, ...] | None = None, purpose: str = ""
) -> tuple[LoadedModel, str]:
    """The model of an inference command line (``ckpt``, ``use_ema``, ``device``, and the
    optional overrides ``rho``/``num_scales``) and the device it is on."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ValueError(
            "ckpt is required: ckpt=/path/to/last.ckpt of a cmexp.train run (or zoo:NAME)"
        )
    device = pick_device(str(cfg.get("device", "auto")))
    loaded = load_model(
        cfg.ckpt,
        use_ema=bool(cfg.get("use_ema", True)),
        device=device,
        kinds=kinds,
        purpose=purpose,
    )
    loaded.spec = loaded.spec.with_overrides(
        log.warning, rho=cfg.get("rho"), num_scales=cfg.get("num_scales")
    )
    return loaded, device
