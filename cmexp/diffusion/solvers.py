"""Probability-flow ODE steps and full ODE samplers over a denoiser D(x, sigma).

The PF-ODE of the EDM/VE setting is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (CM paper
Eq. 3 with the score ``(D - x)/sigma^2``). Solvers are plain functions (k-diffusion style):
``denoiser(x, sigma, class_labels)`` is any callable, grids are explicit descending tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from cmexp.diffusion.karras import append_dims, as_sigma_batch


class Denoiser(Protocol):
    """``D(x [B,C,H,W], sigma scalar|[B], class_labels [B]|None) -> [B,C,H,W]``."""

    def __call__(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor: ...


def euler_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    class_labels: Tensor | None = None,
) -> Tensor:
    """One Euler step of the PF-ODE from ``sigma`` to ``sigma_next`` (1 NFE; CM Alg. 2 with
    Euler, the solver implied by CT). Local error O(h^2).

    Args:
        x: ``[B,C,H,W]`` at noise level sigma. sigma, sigma_next: scalars or ``[B]``.
    """
    s = append_dims(as_sigma_batch(sigma, x).to(x.dtype), x.ndim)
    s_next = append_dims(as_sigma_batch(sigma_next, x).to(x.dtype), x.ndim)
    d = (x - denoiser(x, sigma, class_labels)) / s
    return x + (s_next - s) * d


def heun_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    class_labels: Tensor | None = None,
) -> Tensor:
    """One Heun (EDM 2nd-order) step from ``sigma`` to ``sigma_next > 0`` (2 NFE; CM paper
    CIFAR-10 CD, Table 3). Local error O(h^3).

    ``x_E = x + h d(x, sigma)``; ``x_next = x + h (d(x, sigma) + d(x_E, sigma_next))/2``.
    """
    s = append_dims(as_sigma_batch(sigma, x).to(x.dtype), x.ndim)
    s_next_b = as_sigma_batch(sigma_next, x)
    if bool((s_next_b <= 0).any()):
        raise ValueError("heun_step needs sigma_next > 0; use euler_step for the last step to 0")
    s_next = append_dims(s_next_b.to(x.dtype), x.ndim)
    h = s_next - s
    d = (x - denoiser(x, sigma, class_labels)) / s
    x_euler = x + h * d
    d_next = (x_euler - denoiser(x_euler, sigma_next, class_labels)) / s_next
    return x + h * (d + d_next) / 2


Callback = Callable[[dict], None]


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    class_labels: Tensor | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler PF-ODE sampler along a descending ``sigmas`` grid (ending in 0 for a full solve).

    Args:
        x: ``[B,C,H,W]`` start at ``sigmas[0]`` (e.g. ``sigmas[0] * z``).
        sigmas: ``[M]`` descending; NFE = M - 1.
    """
    _check_descending(sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s, class_labels)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "denoised": denoised})
        if torch.isinf(s):  # zero terminal SNR: x is the VP state z (cmexp.diffusion.samplers)
            x = denoised + s_next * x
        else:
            x = x + (s_next - s) * (x - denoised) / s
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    class_labels: Tensor | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """EDM Heun sampler (Karras et al. 2022, Alg. 1, deterministic): Heun steps between
    positive sigmas, an Euler step into ``sigma = 0``. With ``append_zero(karras_sigmas(18))``
    this is the CIFAR-10 teacher sampler with NFE = 2*18 - 1 = 35 (CM paper Table 1)."""
    _check_descending(sigmas)
    _check_finite_start(sigmas, "sample_heun")
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s, class_labels)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "denoised": denoised})
        d = (x - denoised) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next, class_labels)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


def _check_finite_start(sigmas: Tensor, name: str) -> None:
    if bool(torch.isinf(sigmas[0])):
        raise ValueError(
            f"{name} needs a finite sigmas[0]; start a zero-terminal-SNR model (sigma_max = inf) "
            "with sampler=ddim, ddpm or euler"
        )


def _check_descending(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor with >= 2 entries, got shape {tuple(sigmas.shape)}"
        )
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}")
