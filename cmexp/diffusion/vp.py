"""Noise schedules of the DDPM line and the VP preconditioning, in this suite's sigma.

A discrete VP schedule is its ``alpha_bars`` ``[T]`` (``alpha_bar_t``, t = 1..T, strictly
decreasing): ``x_vp = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``. It is the VE process
``x_ve = x0 + sigma eps`` seen through

    sigma = sqrt((1 - alpha_bar) / alpha_bar),   alpha_bar = 1 / (1 + sigma^2),
    x_vp = x_ve / sqrt(1 + sigma^2),

so a VP model is a denoiser ``D(x_ve, sigma)`` like the EDM teacher, and every sampler of
:mod:`cmexp.diffusion.samplers` / :mod:`cmexp.diffusion.solvers` runs it unchanged.

Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", Alg. 1) rescales ``sqrt(alpha_bar)`` so that ``alpha_bar_T = 0`` exactly while
``alpha_bar_1`` is kept: then ``sigma_T = inf``. There the VE state is infinite, so this suite
represents it by its VP state (``x_vp = z``, pure noise): sampling starts from ``z`` and the
first step is the DDIM step from alpha_bar = 0, ``x = D(z, inf) + sigma_1 z``, with ``D(z, inf)``
the model's x0 prediction from pure noise. Only v- and x0-prediction define it (an
epsilon-prediction model cannot: ``x0 = (x_vp - sqrt(1-alpha_bar) eps)/sqrt(alpha_bar)`` is
0/0), which is why Lin et al. switch to v-prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import append_dims, as_sigma_batch
from cmexp.diffusion.precond import _Precond, precond_args, register_precond

PREDICTIONS = ("eps", "v", "x0")


# ---------------------------------------------------------------- alpha-bar schedules
def linear_alpha_bars(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4): ``beta_t`` linear from ``beta_start``
    to ``beta_end`` over ``num_steps`` (1e-4 -> 0.02, T = 1000), ``alpha_bar_t =
    prod_{s<=t}(1 - beta_s)``. Returns ``[T]`` float64, t = 1..T."""
    _check_num_steps(num_steps)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    betas = torch.linspace(beta_start, beta_end, int(num_steps), dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_alpha_bars(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ``alpha_bar(t) = f(t)/f(0)``,
    ``f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``, s = 0.008, each ``beta_t`` clipped at
    ``max_beta = 0.999``. Returns ``[T]`` float64, t = 1..T."""
    _check_num_steps(num_steps)
    if not s >= 0:
        raise ValueError(f"s must be >= 0, got {s!r}")
    if not 0 < max_beta <= 1:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta!r}")
    t = torch.arange(int(num_steps) + 1, dtype=torch.float64) / int(num_steps)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


def rescale_zero_terminal_snr(alpha_bars: Tensor) -> Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale ``sqrt(alpha_bar)`` so that the last entry is
    exactly 0 (SNR_T = 0) and the first is unchanged; returns the new ``alpha_bars``."""
    ab = check_alpha_bars(alpha_bars)
    root = ab.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def check_alpha_bars(alpha_bars: Tensor | Sequence[float], key: str = "alpha_bars") -> Tensor:
    """``alpha_bars`` as a float64 ``[T]`` tensor: in [0, 1], strictly decreasing (the signal
    falls as t grows), at least 2 entries; otherwise a ValueError naming ``key``."""
    ab = torch.as_tensor(alpha_bars, dtype=torch.float64).flatten()
    if ab.numel() < 2:
        raise ValueError(f"{key} must hold at least 2 levels, got {ab.numel()}")
    if bool(torch.isnan(ab).any()) or bool(((ab < 0) | (ab > 1)).any()):
        raise ValueError(
            f"{key} must lie in [0, 1], got min {ab.min().item()}, max {ab.max().item()}"
        )
    up = torch.nonzero(ab[1:] >= ab[:-1])
    if len(up):
        t = int(up[0]) + 1
        raise ValueError(
            f"{key} must be strictly decreasing (alpha_bar falls as t grows), got "
            f"{key}[{t}]={ab[t].item():.6g} >= {key}[{t - 1}]={ab[t - 1].item():.6g}"
        )
    return ab


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """``sigma = sqrt((1 - alpha_bar)/alpha_bar)``; inf at alpha_bar = 0."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """``alpha_bar = 1/(1 + sigma^2)``; 0 at sigma = inf."""
    return 1 / (1 + sigma**2)


def ve_to_vp(x: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_vp = x_ve / sqrt(1 + sigma^2)`` (sigma scalar or ``[B]``; finite)."""
    s = append_dims(as_sigma_batch(sigma, x).to(x.dtype), x.ndim)
    return x / (1 + s**2).sqrt()


def vp_to_ve(x: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_ve = x_vp sqrt(1 + sigma^2)`` (sigma scalar or ``[B]``; finite)."""
    s = append_dims(as_sigma_batch(sigma, x).to(x.dtype), x.ndim)
    return x * (1 + s**2).sqrt()


def _check_num_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")


class VPSchedule:
    """A discrete VP schedule as noise levels: the object an EDM-style teacher trains and
    samples with instead of the lognormal sigma and the Karras grid.

    Args:
        alpha_bars: ``[T]`` strictly decreasing (:func:`linear_alpha_bars`,
            :func:`cosine_alpha_bars`, or explicit values).
        zero_terminal_snr: rescale with :func:`rescale_zero_terminal_snr` (then
            ``sigma_max = inf``).

    Training draws ``t ~ U{1..T}`` (DDPM's uniform timesteps) and returns ``sigma_t``;
    sampling with ``N`` steps uses the "trailing" timesteps ``t_j = round(T - j T/N)``,
    j = 0..N-1 (Lin et al. 2024, Sec. 3.3: the first step starts at t = T, so a zero-SNR
    model starts from pure noise), then a final step into sigma = 0.
    """

    def __init__(
        self, alpha_bars: Tensor | Sequence[float], zero_terminal_snr: bool = False
    ) -> None:
        ab = check_alpha_bars(alpha_bars, key="vp_schedule.alpha_bars")
        if zero_terminal_snr:
            ab = rescale_zero_terminal_snr(ab)
        self.alpha_bars = ab
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.sigmas = alpha_bar_to_sigma(ab)  # ascending in t: sigmas[0] = sigma_1

    @property
    def num_steps(self) -> int:
        return len(self.alpha_bars)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def draw(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """``[n]`` float32 noise levels ``sigma_t``, ``t ~ U{1..T}`` (inf entries at t = T of a
        zero-SNR schedule)."""
        t = torch.randint(0, self.num_steps, (n,), device=device)
        return self.sigmas.to(device=device, dtype=torch.float32)[t]

    def plan(self, num_steps: int) -> list[float]:
        """Descending noise levels of an ``num_steps``-step sampler on the trailing timesteps,
        without the final 0 (``[sigma_T, ..., ]``, ``num_steps`` levels)."""
        if int(num_steps) != num_steps or not 1 <= num_steps <= self.num_steps:
            raise ValueError(
                f"num_scales must be an integer in [1, {self.num_steps}], got {num_steps!r}"
            )
        T, n = self.num_steps, int(num_steps)
        ts = [round(T - j * T / n) for j in range(n)]  # 1-based timesteps, descending
        return [float(self.sigmas[t - 1]) for t in ts]


# ---------------------------------------------------------------- VP preconditioning
def vp_scalings(sigma: Tensor, prediction: str = "v") -> tuple[Tensor, Tensor, Tensor]:
    """``c_skip, c_out, c_in`` of ``D(x_ve, sigma) = c_skip x_ve + c_out F(c_in x_ve)`` for a
    network F that predicts ``prediction`` from the VP state ``c_in x_ve = x_vp``:

    * ``eps``: ``D = x_ve - sigma F`` (c_skip 1, c_out -sigma; EDM Table 1's VP column).
    * ``x0``:  ``D = F`` (c_skip 0, c_out 1).
    * ``v`` (Salimans & Ho 2022, ``v = sqrt(ab) eps - sqrt(1-ab) x0``):
      ``x0 = sqrt(ab) x_vp - sqrt(1-ab) v``, i.e. c_skip ``1/(1+sigma^2)``,
      c_out ``-sigma/sqrt(1+sigma^2)`` (EDM's scalings with sigma_data = 1, sign flipped).

    ``c_in = 1/sqrt(1 + sigma^2)``. At sigma = inf the input is already the VP state
    (module docstring), so c_in = 1 there, and the limits c_skip = 0, c_out = -1 (v) / 1 (x0)
    are used. Any shape; the results have sigma's shape.
    """
    inf = torch.isinf(sigma)
    s = torch.where(inf, torch.zeros_like(sigma), sigma)  # finite stand-in, replaced below
    root = (1 + s**2).sqrt()
    c_in = torch.where(inf, torch.ones_like(s), 1 / root)
    if prediction == "eps":
        if bool(inf.any()):
            raise ValueError(
                "prediction=eps cannot denoise at zero terminal SNR (sigma = inf): use prediction=v "
                "or x0 (Lin et al. 2024)"
            )
        return torch.ones_like(s), -s, c_in
    if prediction == "x0":
        return torch.zeros_like(s), torch.ones_like(s), c_in
    if prediction == "v":
        c_skip = torch.where(inf, torch.zeros_like(s), 1 / root**2)
        c_out = torch.where(inf, -torch.ones_like(s), -s / root)
        return c_skip, c_out, c_in
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


@register_precond("vp")
class VPrecond(_Precond):
    """A VP-parameterised network as an EDM-style denoiser ``D(x_ve, sigma)``
    (:func:`vp_scalings`), so the EDM loss, the samplers and the checkpoints treat it like
    :class:`cmexp.diffusion.EDMPrecond`.

    Args:
        net: raw network (``cmexp.nets``), fed ``x_vp`` and ``c_noise``.
        prediction: "v" (PD paper; needed at zero terminal SNR), "eps" (DDPM) or "x0".
        sigma_min, sigma_max: the schedule's ``sigma_1`` and ``sigma_T`` (inf at zero SNR).
        sigma_data: kept for the EDM loss weighting (1.0 makes that weighting
            ``1 + 1/sigma^2 = 1 + SNR``: the v-MSE); the scalings do not use it.
        c_noise_scale: ``c_noise = c_noise_scale * (2/pi) arctan(sigma)``: the time of the
            offset-free cosine schedule (``alpha_bar = cos^2(pi t/2)``), in [0, 1] times the
            scale; finite at sigma = inf, unlike EDM's ``ln sigma``.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 1.0,
        c_noise_scale: float = 1.0,
        prediction: str = "v",
    ) -> None:
        super().__init__(net, sigma_min, sigma_max, sigma_data, c_noise_scale)
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"model.precond.prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}"
            )
        if prediction == "eps" and math.isinf(self.sigma_max):
            raise ValueError(
                "model.precond.prediction=eps cannot be used with a zero-terminal-SNR schedule "
                "(vp_schedule.zero_terminal_snr=true, sigma_max = inf): use prediction=v (Lin et al. 2024)"
            )
        self.prediction = prediction

    @classmethod
    def from_meta(cls, net: nn.Module, meta: dict[str, Any]) -> nn.Module:
        prediction = str(meta["precond"].get("prediction", "v"))
        return cls(net, *precond_args(meta), prediction=prediction)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return self.c_noise_scale * (2 / math.pi) * torch.atan(sigma)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return vp_scalings(sigma, self.prediction)

    def describe(self) -> dict[str, str]:
        """What a checkpoint records to rebuild the wrapper."""
        return {"name": "vp", "prediction": self.prediction}


def noisy_input(images: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """``x0 + sigma n`` per sample; the VP state ``n`` where sigma = inf (zero terminal SNR)."""
    s = append_dims(sigma.to(images.dtype), images.ndim)
    inf = torch.isinf(s)
    return torch.where(inf, noise, images + torch.where(inf, torch.zeros_like(s), s) * noise)
