"""The EDM teacher (Karras et al. 2022): denoising loss, sampling EMA, Heun samples; optionally
a VP-parameterised teacher on a discrete DDPM-line schedule (``model=edm_vp``)."""

from __future__ import annotations

from typing import Any


import torch
from torch import Tensor, nn

from cmexp.diffusion.guidance import drop_labels
from cmexp.diffusion.precond import EDMPrecond
from cmexp.diffusion.rng import global_draw
from cmexp.diffusion.vp import VPSchedule
from cmexp.inference.plan import SamplingSpec, check_sampler
from cmexp.methods.edm.loss import EDMLoss
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory


class EDMLitModule(DiffusionLitModule):
    """Trains an EDM denoiser D(x, sigma) = EDMPrecond(net); the teacher for CD.

    Args:
        net: raw network (``cmexp.nets``). loss: :class:`EDMLoss`.
        sample_num_scales: N of the sampler for sample grids (18 -> Heun NFE 35, CM Table 1).
        sampler: the model's own sampler (sample grids, and ``cmexp.sample``'s default):
            heun (EDM), or ddim for a zero-terminal-SNR VP teacher (Heun cannot start at inf).
        precond: the wrapper around ``net`` with its constants (``EDMPrecond``: sigma range
            [0.002, 80], sigma_data 0.5, c_noise_scale 0.25; a VP teacher:
            ``cmexp.diffusion.VPrecond`` with ``prediction: v|eps|x0``).
        noise_schedule: a discrete VP schedule (:class:`cmexp.diffusion.VPSchedule`): its
            ``sigma_1``/``sigma_T`` replace the wrapper's sigma range (``sigma_T`` = inf at zero
            terminal SNR), the loss draws sigma from it, and sampling uses its trailing timesteps.
        label_dropout: probability that a training label is replaced by the null label
            (class-conditional nets only), so the same network is also the unconditional
            denoiser that classifier-free guidance needs (Ho & Salimans 2022: 0.1 or 0.2; 0.1).
    """

    kind = "edm"

    def __init__(
        self,
        net: nn.Module,
        loss: EDMLoss,
        optimizer: OptimizerFactory,
        precond: PrecondFactory = EDMPrecond,
        rho: float = 7.0,
        sample_num_scales: int = 18,
        sampler: str = "heun",
        noise_schedule: VPSchedule | None = None,
        label_dropout: float = 0.0,
        **base: Any,
    ) -> None:
        super().__init__(optimizer, **base)
        self.noise_schedule = noise_schedule
        vp = {}
        if noise_schedule is not None:
            vp = {"sigma_min": noise_schedule.sigma_min, "sigma_max": noise_schedule.sigma_max}
        self.model = precond(net, **vp)
        self._init_ema()
        self.loss = loss
        if noise_schedule is not None and getattr(loss, "noise_schedule", None) is None:
            loss.noise_schedule = noise_schedule
        self.rho = float(rho)
        self.sample_num_scales = int(sample_num_scales)
        self.sampler = check_sampler(sampler, self.sampling_spec())
        if not 0 <= label_dropout < 1:
            raise ValueError(f"model.label_dropout must be in [0, 1), got {label_dropout}")
        self.label_dropout = float(label_dropout)

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        if labels is not None and self.label_dropout > 0:
            keep = global_draw(
                lambda n: torch.rand(n, device=images.device), images.shape[0], self.shard()
            )
            labels = drop_labels(labels, self.label_dropout, self.label_dim, keep)
        return self.loss(self.model, images, labels, shard=self.shard()).mean(), {}

    def sampling_spec(self) -> SamplingSpec:
        m, vp = self.model, self.noise_schedule
        return SamplingSpec(
            family="denoiser",
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            rho=self.rho,
            num_scales=self.sample_num_scales,
            sampler=getattr(self, "sampler", "heun"),
            alpha_bars=tuple(vp.alpha_bars.tolist()) if vp is not None else (),
        )
