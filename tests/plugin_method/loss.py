"""The log-uniform EDM loss: EDM's weighted denoising loss (Karras et al. 2022, Eq. 2 and
Table 1's lambda(sigma)) with ``ln sigma ~ U[ln sigma_lo, ln sigma_hi]``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cmexp.diffusion.rng import global_draw


class LogUniformEDMLoss:
    """Per-sample loss ``[B]``: ``lambda(sigma) ||D(x + sigma n, sigma) - x||^2`` (mean over
    pixels), ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``."""

    def __init__(self, sigma_lo: float, sigma_hi: float, sigma_data: float = 0.5) -> None:
        if not 0 < sigma_lo < sigma_hi:
            raise ValueError(
                f"model.loss.sigma_lo={sigma_lo} must be in (0, model.loss.sigma_hi={sigma_hi})"
            )
        self.sigma_lo, self.sigma_hi, self.sigma_data = sigma_lo, sigma_hi, sigma_data

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor | None,
        shard: tuple[int, int] = (0, 1),
    ) -> Tensor:
        b = images.shape[0]
        u = global_draw(lambda n: torch.rand(n, device=images.device), b, shard)
        lo, hi = math.log(self.sigma_lo), math.log(self.sigma_hi)
        sigma = (lo + (hi - lo) * u).exp()
        noise = torch.randn_like(images)
        s = sigma.view(-1, 1, 1, 1)
        denoised = model(images + s * noise, sigma, labels)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return weight * (denoised - images).square().flatten(1).mean(1)
