"""The continuous-time consistency objective of sCT / sCD (Lu & Song 2024, arXiv 2410.11081,
Sec. 4.2 and Alg. 1) in TrigFlow time.

Per example: ``tan(t) = e^tau / sd`` with ``tau ~ N(P_mean, P_std^2)``, ``z ~ N(0, sd^2 I)``,
``x_t = cos(t) x0 + sin(t) z``; ``dx_t/dt = cos(t) z - sin(t) x0`` (sCT, from the data) or
``sd F_teacher(x_t / sd, t)`` (sCD, from the frozen teacher). With ``F^- = stopgrad F_theta``
and ``r`` ramping 0 -> 1 over ``warmup_steps`` (tangent warm-up):

    g = -cos^2(t) (sd F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF^-/dt)
    g <- g / (||g|| + c)                                   (tangent normalisation, c = 0.1)
    loss = lambda(t) e^{w(t)} / D ||F_theta - F^- - g||^2 - w(t)   (adaptive weighting)

``||g||`` is the RMS norm ``||g||_2 / sqrt(D)`` (``tangent_norm="rms"``: FastGen's default
``g_norm_spatial_invariance=True`` and the sCM-mnist reference) or the Euclidean norm
(``tangent_norm="l2"``: the paper's ``||g||`` read literally, sqrt(D) = 55 times larger at
3x32x32, so the same c normalises far less).
``lambda(t) = 1 / (sd tan t)`` (the prior weighting, optional), ``D`` = C H W, ``w`` a small
learned network of t. The loss value is ``lambda e^w ||g||^2 / D - w``; its gradient in theta is
``-2 lambda e^w / D g . dF_theta/dtheta``, the sCM gradient. ``cos(t) sin(t) dF^-/dt`` is one
forward-mode product (``torch.func.jvp``) with tangents ``(cos t sin t dx_t/dt, cos t sin t)``
(the "JVP rearrangement": bounded for every t), or its central finite difference
(the shared tangent objects of :mod:`cmexp.losses.tangent`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw, replay_rng
from cmexp.losses.tangent import JVP, DirectionalDerivative, FiniteDifference

#: ``fn(x_t [B,C,H,W], t [B]) -> F [B,C,H,W]``: the network read as TrigFlow's F.
FFn = Callable[[Tensor, Tensor], Tensor]


def trigflow_tangent(
    tangent: DirectionalDerivative, fn: FFn, x_t: Tensor, t: Tensor, dxdt: Tensor
) -> Tensor:
    """``cos(t) sin(t) dF/dt`` along ``(dx_t/dt, 1)``: the shared directional derivative
    (``tangent=jvp | finite_difference``, :mod:`cmexp.losses.tangent`) with tangents
    ``(cos t sin t dx_t/dt, cos t sin t)`` (the "JVP rearrangement": bounded for every t).
    x_t, dxdt ``[B,C,H,W]``; t ``[B]``."""
    vt = torch.cos(t) * torch.sin(t)
    vx = append_dims(vt, x_t.ndim).to(dxdt.dtype) * dxdt
    return tangent.derivative(fn, (x_t, t), (vx, vt))


def check_trigflow_tangent(tangent: DirectionalDerivative, model: nn.Module) -> None:
    """One tangent through ``model.F`` (a TrigFlow wrapper) on a one-image batch; a layer
    without forward-mode AD raises a ValueError naming it (nothing to check for finite
    differences). The global RNG is untouched."""
    gen = torch.Generator().manual_seed(0)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    shape = (1, model.img_channels, model.img_resolution, model.img_resolution)
    x = torch.randn(shape, generator=gen).to(dev)
    v = torch.randn(shape, generator=gen).to(dev)
    t = torch.full((1,), 0.7, device=dev)
    labels = torch.zeros(1, dtype=torch.long, device=dev) if model.label_dim > 0 else None
    tangent.check_probe(
        model,
        lambda: model.F(x, t, labels),
        lambda: trigflow_tangent(tangent, lambda a, b: model.F(a, b, labels), x, t, v),
    )


class JVPTangent(JVP):
    """sCM's ``cos(t) sin(t) dF/dt`` by forward-mode AD, called as ``tangent(fn, x_t, t,
    dxdt)`` (the shared :class:`cmexp.losses.tangent.JVP` that ``tangent=jvp`` builds, with
    sCM's tangents; :func:`trigflow_tangent`)."""

    def __call__(self, fn: FFn, x_t: Tensor, t: Tensor, dxdt: Tensor) -> Tensor:
        """x_t, dxdt ``[B,C,H,W]``; t ``[B]`` -> ``cos t sin t dF/dt`` ``[B,C,H,W]``."""
        return trigflow_tangent(self, fn, x_t, t, dxdt)

    def check(self, model: nn.Module) -> None:
        """:func:`check_trigflow_tangent`."""
        check_trigflow_tangent(self, model)


class FiniteDifferenceTangent(FiniteDifference):
    """sCM's ``cos(t) sin(t) dF/dt`` as a central difference along ``(cos t sin t dx_t/dt,
    cos t sin t)`` with step ``eps`` (two forward passes with the same dropout masks; the
    step keeps ``t +- eps cos t sin t`` inside (0, pi/2) for every t)."""

    def __call__(self, fn: FFn, x_t: Tensor, t: Tensor, dxdt: Tensor) -> Tensor:
        return trigflow_tangent(self, fn, x_t, t, dxdt)

    def check(self, model: nn.Module) -> None:
        """Nothing to check: any network runs forward."""


class AdaptiveWeight(nn.Module):
    """sCM's learned adaptive weighting ``w_phi(t)`` (Sec. 4.2, EDM2's log-variance head):
    sinusoidal features of t (frequencies 1 .. 1000, geometric) -> Linear -> SiLU -> Linear -> 1,
    the last layer zero-initialised (w = 0 at the start). ``t [B] -> w [B]`` in float32.

    Args:
        channels: feature and hidden width (128).
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(
                f"model.weighting.channels must be an even integer >= 2, got {channels!r}"
            )
        half = channels // 2
        self.register_buffer("freqs", torch.logspace(0, 3, half), persistent=False)
        self.hidden = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: Tensor) -> Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            arg = t.float()[:, None] * self.freqs[None, :]
            feats = torch.cat([arg.sin(), arg.cos()], dim=1)
            return self.out(torch.nn.functional.silu(self.hidden(feats)))[:, 0]


@dataclass
class SCMLossOutput:
    """Per-sample loss ``[B]``, TrigFlow times ``t [B]``, weights ``w [B]``, the tangent's norm
    before normalisation ``[B]`` and the warm-up factor r."""

    loss: Tensor
    t: Tensor
    w: Tensor
    tangent_norm: Tensor
    warmup: float


TANGENT_NORMS = ("rms", "l2")


class SCMLoss:
    """The sCT / sCD objective (module docstring; sCM Alg. 1).

    Args:
        tangent: the shared directional derivative (``tangent=jvp | finite_difference``:
            :class:`cmexp.losses.tangent.JVP` or ``FiniteDifference``).
        P_mean, P_std: the time proposal ``tan t = e^tau / sd``, ``tau ~ N(P_mean, P_std^2)``
            (sCM App. G, CIFAR-10: -1.0, 1.4; 1.8 from an EDM initialisation, sCM Table 3).
        warmup_steps: tangent warm-up, r = min(1, step / warmup_steps) (sCM: 10k iterations;
            0 = none).
        tangent_c: c of the tangent normalisation g / (||g|| + c) (sCM: 0.1).
        tangent_norm: ``"rms"`` (||g||_2 / sqrt(D), FastGen's ``g_norm_spatial_invariance``
            default) or ``"l2"`` (||g||_2).
        prior_weighting: multiply by 1 / (sd tan t) (sCM's prior weighting).
        sigma_data: sd (0.5).
        teacher: sCD's frozen teacher, anything with ``velocity(x_t, t, labels) -> dx_t/dt``
            (:class:`~cmexp.diffusion.trigflow.EDMTrigFlowPrecond`); None = sCT.
    """

    def __init__(
        self,
        tangent: DirectionalDerivative,
        P_mean: float = -1.0,
        P_std: float = 1.4,
        warmup_steps: int = 10000,
        tangent_c: float = 0.1,
        tangent_norm: str = "rms",
        prior_weighting: bool = True,
        sigma_data: float = 0.5,
        teacher: Any = None,
    ) -> None:
        if not P_std > 0:
            raise ValueError(f"model.loss.P_std must be > 0, got {P_std!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(
                f"model.loss.warmup_steps must be an integer >= 0, got {warmup_steps!r}"
            )
        if not tangent_c > 0:
            raise ValueError(f"model.loss.tangent_c must be > 0, got {tangent_c!r}")
        if not sigma_data > 0:
            raise ValueError(f"model.sigma_data must be > 0, got {sigma_data!r}")
        if tangent_norm not in TANGENT_NORMS:
            raise ValueError(
                f"model.loss.tangent_norm must be one of {', '.join(TANGENT_NORMS)}, "
                f"got {tangent_norm!r}"
            )
        self.tangent = tangent
        self.tangent_norm = tangent_norm
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.warmup_steps, self.tangent_c = int(warmup_steps), float(tangent_c)
        self.prior_weighting, self.sigma_data = bool(prior_weighting), float(sigma_data)
        self.teacher = teacher

    def warmup(self, step: int) -> float:
        """Tangent warm-up factor ``r = min(1, step / warmup_steps)``."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def draw_times(self, n: int, device: torch.device) -> Tensor:
        """``[n]`` TrigFlow times, ``t = arctan(e^tau / sd)``."""
        tau = torch.randn(n, device=device) * self.P_std + self.P_mean
        return torch.atan(tau.exp() / self.sigma_data)

    def __call__(
        self,
        model: nn.Module,
        weight_net: nn.Module,
        images: Tensor,
        class_labels: Tensor | None = None,
        step: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> SCMLossOutput:
        """images ``[B,C,H,W]`` in [-1, 1]; ``step``: the optimizer step (warm-up); ``shard``:
        (rank, world_size): times and noise are drawn for the global batch and sliced."""
        b, dev = images.shape[0], images.device
        t = global_draw(lambda n: self.draw_times(n, dev), b, shard)
        z = global_draw(
            lambda n: torch.randn((n, *images.shape[1:]), device=dev, dtype=images.dtype), b, shard
        )
        return self.terms(model, weight_net, images, self.sigma_data * z, t, class_labels, step)

    def terms(
        self,
        model: nn.Module,
        weight_net: nn.Module,
        x0: Tensor,
        z: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        step: int = 0,
    ) -> SCMLossOutput:
        """The loss for given data ``x0``, noise ``z ~ N(0, sd^2 I)`` (both ``[B,C,H,W]``) and
        times ``t [B]`` in (0, pi/2)."""
        sd = self.sigma_data
        c = append_dims(torch.cos(t), x0.ndim).to(x0.dtype)
        s = append_dims(torch.sin(t), x0.ndim).to(x0.dtype)
        x_t = c * x0 + s * z
        with torch.no_grad():
            if self.teacher is None:
                dxdt = c * z - s * x0  # sCT: the conditional velocity
            else:
                dxdt = self.teacher.velocity(x_t, t, class_labels).to(x0.dtype)

        def fn(x: Tensor, tt: Tensor) -> Tensor:
            return model.F(x, tt, class_labels)

        # The tangent pass runs first on a replay of the RNG state the online pass then uses
        # (same dropout masks; the stream continues as after one pass).
        with replay_rng(x0.device) as replay:
            with torch.no_grad(), replay():
                sc_dfdt = trigflow_tangent(self.tangent, fn, x_t, t, dxdt).detach()
            F = model.F(x_t, t, class_labels)
        f_minus = F.detach()
        r = self.warmup(step)
        g = -(c**2) * (sd * f_minus - dxdt) - r * (c * s * x_t + sd * sc_dfdt)
        dim = x0[0].numel()
        norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(dim)
        g = g / (append_dims(norm, g.ndim) + self.tangent_c)
        w = weight_net(t)
        sq = ((F - f_minus - g) ** 2).flatten(1).sum(1)
        prior = 1 / (sd * torch.tan(t)) if self.prior_weighting else torch.ones_like(t)
        loss = prior * torch.exp(w) / dim * sq - w
        return SCMLossOutput(loss=loss, t=t, w=w.detach(), tangent_norm=norm.detach(), warmup=r)


def trigflow_sigma_taus(t_mids: list[float], sigma_data: float) -> tuple[float, ...]:
    """sCM's intermediate TrigFlow times as the suite's sigma taus: ``sd tan(t)``."""
    return tuple(sigma_data * math.tan(float(t)) for t in t_mids)
