"""EDM denoising loss for the teacher (Karras et al. 2022, Sec. 5 and Table 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cmexp.diffusion.solvers import Denoiser
from cmexp.diffusion.vp import noisy_input


class EDMLoss:
    """``lambda(sigma) ||D(x + sigma n, sigma) - x||^2`` with ``ln sigma ~ N(P_mean, P_std^2)``
    and ``lambda = (sigma^2 + sd^2) / (sigma sd)^2 = 1/sd^2 + 1/sigma^2``.

    EDM values (also the CM paper's CIFAR-10 teacher, reference.md 1.11): P_mean = -1.2,
    P_std = 1.2, sigma_data = 0.5. The squared error is averaged over C,H,W (EDM sums it;
    the difference is a constant factor absorbed by the learning rate).

    Args:
        noise_schedule: draw sigma from a discrete VP schedule instead
            (:class:`cmexp.diffusion.VPSchedule`: ``t ~ U{1..T}``, DDPM's training); with
            ``sigma_data = 1`` lambda is ``1 + SNR``, the v-prediction MSE. Zero-terminal-SNR
            draws (sigma = inf) feed the denoiser the VP state (pure noise), lambda = 1/sd^2.
    """

    def __init__(
        self,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        noise_schedule: Any = None,
    ) -> None:
        if P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {P_std!r}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.noise_schedule = noise_schedule

    def __call__(
        self,
        denoiser: Denoiser,
        images: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Tensor:
        """images ``[B,C,H,W]`` in [-1,1] -> per-sample loss ``[B]``. ``shard``: (rank,
        world_size) of a DDP step (randomness drawn for the global batch, then sliced)."""
        from cmexp.diffusion.rng import global_draw

        b = images.shape[0]
        if self.noise_schedule is not None:
            sigma = global_draw(lambda n: self.noise_schedule.draw(n, images.device), b, shard)
        else:
            sigma = global_draw(lambda n: torch.randn(n, device=images.device), b, shard)
            sigma = (sigma * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        weight = torch.where(
            torch.isinf(sigma), torch.full_like(weight, self.sigma_data**-2), weight
        )  # inf/inf
        noise = global_draw(
            lambda n: torch.randn(
                (n, *images.shape[1:]), device=images.device, dtype=images.dtype
            ),
            b,
            shard,
        )
        noisy = noisy_input(images, sigma, noise)
        denoised = denoiser(noisy, sigma, class_labels)
        return weight * ((denoised - images) ** 2).flatten(1).mean(1)
