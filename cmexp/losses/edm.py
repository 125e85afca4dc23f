"""EDM denoising loss for the teacher (Karras et al. 2022, Sec. 5 and Table 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.solvers import Denoiser


class EDMLoss:
    """``lambda(sigma) ||D(x + sigma n, sigma) - x||^2`` with ``ln sigma ~ N(P_mean, P_std^2)``
    and ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``.

    EDM values (also the CM paper's CIFAR-10 teacher, reference.md 1.11): P_mean = -1.2,
    P_std = 1.2, sigma_data = 0.5. The squared error is averaged over C,H,W (EDM sums it;
    the difference is a constant factor absorbed by the learning rate).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> None:
        if P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {P_std!r}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def __call__(
        self, denoiser: Denoiser, images: Tensor, class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Tensor:
        """images ``[B,C,H,W]`` in [-1,1] -> per-sample loss ``[B]``. ``shard``: (rank,
        world_size) of a DDP step (randomness drawn for the global batch, then sliced)."""
        from cmexp.losses.consistency import global_draw

        b = images.shape[0]
        sigma = global_draw(lambda n: torch.randn(n, device=images.device), b, shard)
        sigma = (sigma * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = global_draw(lambda n: torch.randn((n, *images.shape[1:]), device=images.device, dtype=images.dtype), b, shard)
        noisy = images + append_dims(sigma, images.ndim) * noise
        denoised = denoiser(noisy, sigma, class_labels)
        return weight * ((denoised - images) ** 2).flatten(1).mean(1)
