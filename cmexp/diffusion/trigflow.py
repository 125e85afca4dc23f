"""TrigFlow parameterisation of continuous-time consistency models (sCM: Lu & Song 2024,
"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", arXiv 2410.11081).

TrigFlow (sCM Sec. 2.2/3): ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sd^2 I)``,
``t in [0, pi/2]``, ``sd = sigma_data``; the PF-ODE is ``dx_t/dt = sd F(x_t / sd, t)`` and the
consistency function is ``f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t))``
(sCM Eq. 7), so ``f(x, 0) = x`` exactly.

EDM <-> TrigFlow (the suite's one time variable is sigma; the angle t lives only in this mode):
``sigma = sd tan(t)`` and ``x_sigma = x_t / cos(t)`` (``x_sigma = x0 + sigma eps``, eps ~ N(0, I)).
An EDM denoiser ``D(x_sigma, sigma)`` gives the TrigFlow teacher
``sd F_teacher(x_t, t) = (cos(t) x_t - D(x_t / cos(t), sd tan(t))) / sin(t)``, i.e. the PF-ODE
``dx_t/dt = sd F_teacher``. For an EDM-preconditioned network (EDM Table 1 scalings with the same
sd) this is exact algebra: ``c_skip = cos^2 t``, ``c_out = sd sin t``, ``c_in x_sigma = x_t / sd``,
so ``F_teacher = -F_raw(x_t / sd, c_noise_EDM(sd tan t))`` (:class:`EDMTrigFlowPrecond`).

Every wrapper here also has the suite's sigma interface ``forward(x_sigma, sigma, labels)``
returning the consistency function's x0 estimate, so the Alg. 1 samplers, the editors and the
tau search work unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims, as_sigma_batch, check_sigma_range
from cmexp.diffusion.precond import WrapsNet, register_precond

HALF_PI = math.pi / 2


def sigma_to_trigflow(sigma: Tensor, sigma_data: float) -> Tensor:
    """``t = arctan(sigma / sd)`` (sigma = inf -> pi/2). Any shape."""
    return torch.atan(sigma / sigma_data)


def trigflow_to_sigma(t: Tensor, sigma_data: float) -> Tensor:
    """``sigma = sd tan(t)``. Any shape."""
    return sigma_data * torch.tan(t)


def check_trigflow_times(
    ts: Sequence[float], key: str = "t", closed_top: bool = False
) -> list[float]:
    """TrigFlow times as floats, each in (0, pi/2) (``closed_top``: (0, pi/2]); otherwise a
    ValueError naming ``key``."""
    out = [float(t) for t in ts]
    for t in out:
        if not (0 < t < HALF_PI or (closed_top and t == HALF_PI)):
            raise ValueError(f"{key} entries must be TrigFlow times in (0, pi/2), got {t}")
    return out


@register_precond("trigflow")
class TrigFlowPrecond(WrapsNet, nn.Module):
    """A raw network as a TrigFlow consistency model (sCM Eq. 7).

    ``F_theta(x_t / sd, c_noise(t))`` with ``c_noise(t) = c_noise_scale * t`` (sCM Sec. 4.1: the
    identity time transformation, with positional or small-scale Fourier embeddings; EDM's
    ln(sigma)/4 has an unbounded derivative at both ends of [0, pi/2]). The time path (angles,
    c_noise, trigonometric coefficients) is computed in float32 or wider.

    Args:
        net: raw network ``net(x_in [B,C,H,W], noise_labels [B], class_labels)``.
        sigma_min, sigma_max: the sigma range of the suite's grids and samplers (the TrigFlow
            boundary is t = 0; sigma_max = 80 is t_max = arctan(80 / 0.5) = 1.56454).
        sigma_data: sd = 0.5 (sCM CIFAR-10).
        c_noise_scale: c_noise(t) = c_noise_scale * t (sCM: 1).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        c_noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_sigma_range(sigma_min, sigma_max)
        if not sigma_data > 0:
            raise ValueError(f"model.precond.sigma_data must be > 0, got {sigma_data!r}")
        if not c_noise_scale > 0:
            raise ValueError(f"model.precond.c_noise_scale must be > 0, got {c_noise_scale!r}")
        self.net = net
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.c_noise_scale = float(sigma_data), float(c_noise_scale)

    @property
    def t_max(self) -> float:
        """TrigFlow time of sigma_max: ``arctan(sigma_max / sd)``."""
        return math.atan(self.sigma_max / self.sigma_data)

    def describe(self) -> dict[str, str]:
        """What a checkpoint records to rebuild the wrapper (``cmexp.inference.loader``)."""
        return {"name": "trigflow"}

    def c_noise(self, t: Tensor) -> Tensor:
        """Noise label of the raw net: ``c_noise_scale * t`` ``[B]``."""
        return self.c_noise_scale * t

    def raw_to_F(self, raw: Tensor) -> Tensor:
        """The network output as TrigFlow's F (identity here)."""
        return raw

    def F(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``F_theta(x_t / sd, c_noise(t))``: x_t ``[B,C,H,W]``, t ``[B]`` -> ``[B,C,H,W]``.
        Differentiable in x_t and t (forward-mode AD for the sCM tangent)."""
        raw = self.net(x_t / self.sigma_data, self.c_noise(t), class_labels)
        return self.raw_to_F(raw)

    def velocity(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The PF-ODE ``dx_t/dt = sd F(x_t / sd, t)`` of the network read as a diffusion model."""
        return self.sigma_data * self.F(x_t, t, class_labels)

    def consistency(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``f(x_t, t) = cos(t) x_t - sin(t) sd F`` (sCM Eq. 7): x_t ``[B,C,H,W]``, t ``[B]``."""
        c = append_dims(torch.cos(t), x_t.ndim).to(x_t.dtype)
        s = append_dims(torch.sin(t), x_t.ndim).to(x_t.dtype)
        return c * x_t - s * self.sigma_data * self.F(x_t, t, class_labels).to(x_t.dtype)

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """The sigma interface: ``f(x_sigma, sigma)`` = ``consistency(x_sigma cos t, t)`` with
        ``t = arctan(sigma / sd)``. x ``[B,C,H,W]``; sigma scalar or ``[B]``. Returns the x0
        estimate ``[B,C,H,W]`` (exactly x at sigma = 0)."""
        sigma = as_sigma_batch(sigma, x)
        if x.dtype == torch.float64:
            sigma = sigma.double()
        t = sigma_to_trigflow(sigma, self.sigma_data)
        x_t = x * append_dims(torch.cos(t), x.ndim).to(x.dtype)
        return self.consistency(x_t, t, class_labels)


@register_precond("trigflow_edm")
class EDMTrigFlowPrecond(TrigFlowPrecond):
    """The TrigFlow view of an EDM-preconditioned network (module docstring): ``F = -F_raw(x_t /
    sd, c_noise_scale ln(sd tan t))``. Its consistency function equals the EDM denoiser,
    ``f(x_t, t) = D(x_t / cos t, sd tan t)``, so a student of this class initialised from an EDM
    teacher starts as the teacher's denoiser (sCD's initialisation, sCM Sec. 5). The EDM time
    label's derivative ``c_noise_scale / (sin t cos t)`` is bounded once multiplied by the
    tangent's ``sin t cos t`` (the loss's JVP rearrangement), but it is the transformation sCM
    Sec. 4.1 replaces; use it to start from an EDM checkpoint.

    Args:
        c_noise_scale: EDM's 0.25 (must be the teacher's).
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        c_noise_scale: float = 0.25,
    ) -> None:
        super().__init__(net, sigma_min, sigma_max, sigma_data, c_noise_scale)

    @classmethod
    def from_denoiser(cls, denoiser: nn.Module) -> EDMTrigFlowPrecond:
        """Wrap an :class:`cmexp.diffusion.EDMPrecond`'s network (shared, not copied)."""
        return cls(
            denoiser.net,
            denoiser.sigma_min,
            denoiser.sigma_max,
            denoiser.sigma_data,
            denoiser.c_noise_scale,
        )

    def describe(self) -> dict[str, str]:
        return {"name": "trigflow_edm"}

    def c_noise(self, t: Tensor) -> Tensor:
        """EDM's ``c_noise_scale ln(sigma)`` with ``sigma = sd tan t``."""
        return self.c_noise_scale * torch.log(self.sigma_data * torch.tan(t) + 1e-44)

    def raw_to_F(self, raw: Tensor) -> Tensor:
        return -raw


class DenoiserTrigFlow:
    """Any denoiser ``D(x_sigma, sigma, labels)`` as a TrigFlow teacher (a callable with
    :meth:`velocity`): ``dx_t/dt = (cos t x_t - D(x_t / cos t, sd tan t)) / sin t``.

    Used for closed-form teachers (``cmexp.diffusion.gaussian_denoiser``); an
    :class:`~cmexp.diffusion.EDMPrecond` teacher is converted exactly by
    :meth:`EDMTrigFlowPrecond.from_denoiser` instead (no cancellation at small t).
    """

    def __init__(self, denoiser: Callable[..., Tensor], sigma_data: float = 0.5) -> None:
        self.denoiser, self.sigma_data = denoiser, float(sigma_data)

    def velocity(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x_t ``[B,C,H,W]``, t ``[B]`` in (0, pi/2) -> dx_t/dt ``[B,C,H,W]``."""
        c = append_dims(torch.cos(t), x_t.ndim).to(x_t.dtype)
        s = append_dims(torch.sin(t), x_t.ndim).to(x_t.dtype)
        x0 = self.denoiser(x_t / c, trigflow_to_sigma(t, self.sigma_data), class_labels)
        return (c * x_t - x0) / s


@torch.no_grad()
def sample_trigflow(
    model: TrigFlowPrecond,
    z: Tensor,
    ts: Sequence[float],
    class_labels: Tensor | None = None,
    noise: Callable[[Tensor], Tensor] | None = None,
    clip_denoised: bool = True,
    clip_output: bool | None = None,
) -> Tensor:
    """sCM's multistep sampler in TrigFlow time (sCM Alg. 1; 1 step: ``ts = [t_max]``, 2 steps:
    ``[t_max, 1.1]``, sCM's intermediate time).

    ``x = f(sd sin(t_0) z, t_0)``; for each later t: ``x = f(cos(t) x + sin(t) sd z', t)``. With
    ``t_0 = arctan(sigma_max / sd)`` this is Alg. 1 of the CM paper in sigma with
    ``taus = sd tan(ts[1:])`` and eps = 0 (tested).

    Args:
        z: ``[B,C,H,W]`` standard normal noise. ts: descending TrigFlow times in (0, pi/2].
        noise: draws the fresh standard normal z' like its argument (default ``randn_like``).
        clip_denoised: clamp each f output to [-1, 1] before re-noising (as the CM paper's
            code; FastGen's sCM sampler does not).
        clip_output: clamp the result to [-1, 1] (None: as ``clip_denoised``).
    """
    ts = check_trigflow_times(ts, "ts", closed_top=True)
    if any(b >= a for a, b in itertools.pairwise(ts)):
        raise ValueError(f"ts must be strictly descending, got {ts}")
    noise = noise or torch.randn_like
    sd = model.sigma_data
    t0 = torch.full(
        (z.shape[0],),
        ts[0],
        device=z.device,
        dtype=torch.float64 if z.dtype == torch.float64 else torch.float32,
    )
    x = model.consistency(sd * math.sin(ts[0]) * z, t0, class_labels)
    for t in ts[1:]:
        if clip_denoised:
            x = x.clamp(-1, 1)
        x_t = math.cos(t) * x + math.sin(t) * sd * noise(x)
        x = model.consistency(x_t, torch.full_like(t0, t), class_labels)
    return x.clamp(-1, 1) if (clip_denoised if clip_output is None else clip_output) else x
