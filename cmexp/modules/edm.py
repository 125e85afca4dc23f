"""The EDM teacher (Karras et al. 2022): denoising loss, sampling EMA, Heun samples; optionally
a VP-parameterised teacher on a discrete DDPM-line schedule (``model=edm_vp``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.guidance import drop_labels
from cmexp.diffusion.precond import EDMPrecond
from cmexp.diffusion.samplers import sample_ddim, sample_ddpm, sample_edm_sde
from cmexp.diffusion.sampling import SeededNoise
from cmexp.diffusion.solvers import sample_euler, sample_heun
from cmexp.diffusion.vp import VPSchedule
from cmexp.inference.plan import SamplingSpec, check_sampler, nfe, sigma_plan
from cmexp.losses.edm import EDMLoss
from cmexp.modules.base import DiffusionLitModule, OptimizerFactory


class EDMLitModule(DiffusionLitModule):
    """Trains an EDM denoiser D(x, sigma) = EDMPrecond(net); the teacher for CD.

    Args:
        net: raw network (``cmexp.nets``). loss: :class:`EDMLoss`.
        sample_num_scales: N of the sampler for sample grids (18 -> Heun NFE 35, CM Table 1).
        sampler: the model's own sampler (sample grids, and ``cmexp.sample``'s default):
            heun (EDM), or ddim for a zero-terminal-SNR VP teacher (Heun cannot start at inf).
        precond: a partial wrapper class around ``net`` (default :class:`EDMPrecond`; a VP
            teacher: ``cmexp.diffusion.VPrecond`` with ``prediction: v|eps|x0``), called with
            ``(net, sigma_min, sigma_max, sigma_data, c_noise_scale)``.
        noise_schedule: a discrete VP schedule (:class:`cmexp.diffusion.VPSchedule`): its
            ``sigma_1``/``sigma_T`` replace ``sigma_min``/``sigma_max`` (``sigma_T`` = inf at zero
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
        sampler: str = "heun",
        precond: Callable[..., nn.Module] | None = None,
        noise_schedule: VPSchedule | None = None,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__(optimizer, ema_decay, lr_warmup_kimg, compile_net, channels_last)
        self.noise_schedule = noise_schedule
        if noise_schedule is not None:
            sigma_min, sigma_max = noise_schedule.sigma_min, noise_schedule.sigma_max
        self.model = (precond or EDMPrecond)(net, sigma_min, sigma_max, sigma_data, c_noise_scale)
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
            from cmexp.losses.consistency import global_draw

            keep = global_draw(
                lambda n: torch.rand(n, device=images.device), images.shape[0], self.shard()
            )
            labels = drop_labels(labels, self.label_dropout, self.label_dim, keep)
        return self.loss(self.model, images, labels, shard=self.shard()).mean(), {}

    def sampling_spec(self) -> SamplingSpec:
        m, vp = self.model, self.noise_schedule
        return SamplingSpec(
            consistency=False,
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            rho=self.rho,
            num_scales=self.sample_num_scales,
            sampler=getattr(self, "sampler", "heun"),
            alpha_bars=tuple(vp.alpha_bars.tolist()) if vp is not None else (),
        )

    @torch.no_grad()
    def sample_images(self, num: int, seed: int = 0) -> dict[str, Any]:
        m = self.ema
        noise = SeededNoise(range(seed, seed + num), self.device)
        z = noise.randn((m.img_channels, m.img_resolution, m.img_resolution))
        plan = sigma_plan(self.sampling_spec())
        sigmas = torch.tensor(plan, dtype=torch.float32, device=self.device)
        samplers = {
            "heun": sample_heun,
            "euler": sample_euler,
            "ddim": sample_ddim,
            "ddpm": sample_ddpm,
            "edm_sde": sample_edm_sde,
        }
        kwargs = {"noise": noise.randn_like} if self.sampler in ("ddim", "ddpm", "edm_sde") else {}
        x = samplers[self.sampler](
            m,
            z if torch.isinf(sigmas[0]) else z * sigmas[0],
            sigmas,
            class_labels=self.grid_labels(num),
            **kwargs,
        )
        return {f"{self.sampler}{nfe(plan, self.sampler)}nfe": x.clamp(-1, 1)}
