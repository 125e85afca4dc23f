"""Progressive distillation (Salimans & Ho 2022, Alg. 2) in the EDM/VE setting of this suite.

A student with ``N`` steps on the levels ``s_0 > ... > s_N`` learns to do in one DDIM step
what its teacher does in two: per example ``i ~ U{0..N-1}``, ``t = s_i``, ``t'' = s_{i+1}``,
``t'`` the level between them on the teacher's grid of ``2N + 1`` levels (Karras grids nest:
``karras(2N+1)[2i] = karras(N+1)[i]``), ``x_t = x + t z``,

    x' = DDIM(teacher, x_t, t -> t'),   x'' = DDIM(teacher, x', t' -> t''),
    x_tilde = (x'' - (t''/t) x_t) / (1 - t''/t),

the clean image whose DDIM step ``t -> t''`` lands on ``x''`` (the PD paper's
``x_tilde = (z'' - (sigma''/sigma) z_t)/(alpha'' - (sigma''/sigma) alpha_t)`` in VE
coordinates; the CM paper's reimplementation, ``euler_to_denoiser``). Loss:
``w(t) d(D_student(x_t, t), x_tilde)`` with ``w = max(SNR, 1)`` (truncated SNR) or
``SNR + 1`` (the v-target) and d = l2 (mean over pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw
from cmexp.diffusion.solvers import Denoiser
from cmexp.losses.distances import Metric
from cmexp.losses.weighting import TruncatedSNRWeighting


@dataclass
class ProgressiveLossOutput:
    """Per-sample loss ``[B]`` and the student's noise levels ``sigma`` ``[B]``."""

    loss: Tensor
    sigma: Tensor


def ddim_levels(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The deterministic DDIM (= Euler) step ``D + (sigma_next/sigma)(x - D)`` with per-sample
    ``[B]`` levels."""
    s = append_dims(sigma.to(x.dtype), x.ndim)
    s_next = append_dims(sigma_next.to(x.dtype), x.ndim)
    return denoised + (s_next / s) * (x - denoised)


@torch.no_grad()
def progressive_target(
    teacher: Denoiser,
    x_t: Tensor,
    sigma: Tensor,
    sigma_mid: Tensor,
    sigma_next: Tensor,
    class_labels: Tensor | None = None,
) -> Tensor:
    """The PD target ``x_tilde`` (module docstring): two teacher DDIM steps
    ``sigma -> sigma_mid -> sigma_next`` from ``x_t``, then the x whose single DDIM step
    ``sigma -> sigma_next`` reaches the same point. Levels ``[B]``, ``sigma_next > 0``."""
    x_mid = ddim_levels(x_t, teacher(x_t, sigma, class_labels), sigma, sigma_mid)
    x_next = ddim_levels(x_mid, teacher(x_mid, sigma_mid, class_labels), sigma_mid, sigma_next)
    r = append_dims((sigma_next / sigma).to(x_t.dtype), x_t.ndim)
    return (x_next - r * x_t) / (1 - r)


class ProgressiveDistillationLoss:
    """One round's objective. ``__call__(student, teacher, images, sigmas)`` with the
    teacher's descending grid ``sigmas`` of ``2N + 1`` levels (T ... sigma_min); the student
    steps on ``sigmas[::2]``.

    Args:
        metric: d(x, y) -> ``[B]`` (l2 in the PD paper and the CM paper's PD).
        weighting: w(sigma) -> ``[B]``: :class:`TruncatedSNRWeighting` (default, both papers'
            CIFAR-10 setting) or :class:`SNRPlusOneWeighting` (the v-target).
    """

    def __init__(self, metric: Metric, weighting=None) -> None:
        self.metric = metric
        self.weighting = weighting if weighting is not None else TruncatedSNRWeighting()

    def __call__(
        self,
        student: Denoiser,
        teacher: Denoiser,
        images: Tensor,
        sigmas: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> ProgressiveLossOutput:
        """Args: images ``[B,C,H,W]`` in [-1,1]; ``sigmas`` ``[2N+1]``; ``shard`` (rank,
        world_size): indices and noise are drawn for the global batch and sliced (DDP)."""
        if sigmas.ndim != 1 or len(sigmas) < 3 or len(sigmas) % 2 == 0:
            raise ValueError(
                f"sigmas must be the teacher's grid of 2N + 1 >= 3 levels, got {tuple(sigmas.shape)}"
            )
        sigmas = sigmas.to(images.device)
        steps = (len(sigmas) - 1) // 2
        b = images.shape[0]
        idx = global_draw(lambda n: torch.randint(0, steps, (n,), device=images.device), b, shard)
        sigma, sigma_mid, sigma_next = sigmas[2 * idx], sigmas[2 * idx + 1], sigmas[2 * idx + 2]
        noise = global_draw(
            lambda n: torch.randn(
                (n, *images.shape[1:]), device=images.device, dtype=images.dtype
            ),
            b,
            shard,
        )
        x_t = images + append_dims(sigma, images.ndim).to(images.dtype) * noise
        target = progressive_target(teacher, x_t, sigma, sigma_mid, sigma_next, class_labels)
        pred = student(x_t, sigma, class_labels)
        loss = self.weighting(sigma).to(pred.dtype) * self.metric(pred, target.detach())
        return ProgressiveLossOutput(loss=loss, sigma=sigma)
