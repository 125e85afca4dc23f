"""IMM's samplers in the registry's calling convention (:class:`cmexp.registry.Sampler`):
``run(model, z, sigmas, *, sigma_min, class_labels, noise, clip)`` with unit noise ``z``
``[B,C,H,W]`` and the descending plan ``sigmas = [T, tau_1, ...]`` (one network evaluation per
level); both return ``[B,C,H,W]``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

NoiseFn = Callable[[Tensor], Tensor]


def _levels(sigmas: Sequence[float] | Tensor, sigma_min: float) -> list[float]:
    """The plan as floats, ending at sigma_min (appended unless it is already the last)."""
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    return sig + [float(sigma_min)] if sig[-1] > sigma_min else sig


def run_pushforward(
    model: nn.Module,
    z: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    sigma_min: float,
    class_labels: Tensor | None = None,
    noise: NoiseFn | None = None,
    clip: bool = True,
) -> Tensor:
    """IMM's pushforward sampling (IMM Alg. 2, App. F): ``x = T z``, then
    ``x <- f(x, s, t)`` for consecutive levels ``(t, s)`` of ``[T, tau_1, ..., sigma_min]``.
    Deterministic (``noise`` is unused); only the final output is clamped (``clip``), the
    intermediate states are noisy."""
    levels = _levels(sigmas, sigma_min)
    x = z * levels[0]
    for cur, nxt in itertools.pairwise(levels):
        x = model(x, cur, class_labels, sigma_next=nxt)
    return x.clamp(-1, 1) if clip else x


def run_pushforward_restart(
    model: nn.Module,
    z: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    sigma_min: float,
    class_labels: Tensor | None = None,
    noise: NoiseFn | None = None,
    clip: bool = True,
) -> Tensor:
    """IMM's restart sampling (App. F): at each level ``t`` of ``[T, tau_1, ...]`` jump to the
    data end, ``x0 = f(x, sigma_min, t)`` (clamped when ``clip``), then re-noise to the next
    level, ``x = x0 + tau z'`` with image i's own fresh noise (IMM's ``add_noise`` on the FM
    path, ``(1 - t) x0 + t sd z'``, is ``x0 + sigma z'`` in sigma)."""
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    draw = noise if noise is not None else torch.randn_like
    x = z * levels[0]
    for i, cur in enumerate(levels):
        x = model(x, cur, class_labels, sigma_next=sigma_min)
        if clip:
            x = x.clamp(-1, 1)
        if i + 1 < len(levels):
            x = x + levels[i + 1] * draw(x)
    return x
