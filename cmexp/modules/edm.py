"""The EDM teacher (Karras et al. 2022): denoising loss, sampling EMA, Heun samples."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.precond import EDMPrecond
from cmexp.diffusion.sampling import SeededNoise
from cmexp.diffusion.solvers import sample_heun
from cmexp.inference.plan import SamplingSpec, sigma_plan
from cmexp.losses.edm import EDMLoss
from cmexp.modules.base import DiffusionLitModule, OptimizerFactory


class EDMLitModule(DiffusionLitModule):
    """Trains an EDM denoiser D(x, sigma) = EDMPrecond(net); the teacher for CD.

    Args:
        net: raw network (``cmexp.nets``). loss: :class:`EDMLoss`.
        sample_num_scales: N of the Heun sampler for sample grids (18 -> NFE 35, CM Table 1).
    """

    kind = "edm"

    def __init__(
        self,
        net: nn.Module,
        loss: EDMLoss,
        optimizer: OptimizerFactory,
        ema_decay: float = 0.9999,
        lr_warmup_kimg: float = 0.0,
        compile_net: bool = False,
        channels_last: bool = False,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        c_noise_scale: float = 0.25,
        sample_num_scales: int = 18,
    ) -> None:
        super().__init__(optimizer, ema_decay, lr_warmup_kimg, compile_net, channels_last)
        self.model = EDMPrecond(net, sigma_min, sigma_max, sigma_data, c_noise_scale)
        self._init_ema()
        self.loss = loss
        self.rho = float(rho)
        self.sample_num_scales = int(sample_num_scales)

    def compute_loss(self, images: Tensor, labels: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        return self.loss(self.model, images, labels, shard=self.shard()).mean(), {}

    def sampling_spec(self) -> SamplingSpec:
        m = self.model
        return SamplingSpec(consistency=False, sigma_min=m.sigma_min, sigma_max=m.sigma_max, rho=self.rho,
                            num_scales=self.sample_num_scales)

    @torch.no_grad()
    def sample_images(self, num: int, seed: int = 0) -> dict[str, Any]:
        m = self.ema
        z = SeededNoise(range(seed, seed + num), self.device).randn(
            (m.img_channels, m.img_resolution, m.img_resolution)
        )
        sigmas = torch.tensor(sigma_plan(self.sampling_spec()), dtype=torch.float32, device=self.device)
        x = sample_heun(m, z * sigmas[0], sigmas)
        return {f"heun{2 * self.sample_num_scales - 1}nfe": x.clamp(-1, 1)}
