"""Consistency distillation (CM paper Alg. 2, Eq. 7) and consistency training (Alg. 3,
Eq. 10) objectives.

Both draw, per example, an index ``j ~ U{0..N-2}`` into the descending Karras grid, set
``sigma = sigmas[j]`` (t_{n+1}) and ``sigma_next = sigmas[j+1]`` (t_n), and return the
unreduced ``lambda(sigma_n) d(f_theta(x + sigma z, sigma), stopgrad f_theta^-(x_hat, sigma_next))``.
CD builds ``x_hat`` with one teacher ODE step; CT uses ``x_hat = x + sigma_next z`` with the
same z (the Euler step with the one-sample score estimate, Thm. 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from cmexp.diffusion.guidance import GuidanceRange, GuidedDenoiser
from cmexp.diffusion.karras import append_dims
from cmexp.diffusion.rng import global_draw, replay_rng
from cmexp.diffusion.solvers import Denoiser
from cmexp.losses.distances import Metric
from cmexp.losses.types import ConsistencyFn, ConsistencyLossOutput
from cmexp.losses.weighting import UniformWeighting

Solver = Callable[..., Tensor]


class UniformIndices:
    """``j ~ U{0, ..., N-2}`` (CM paper: n ~ U[[1, N-1]])."""

    def __call__(self, sigmas: Tensor, batch_size: int, device: torch.device) -> Tensor:
        return torch.randint(0, len(sigmas) - 1, (batch_size,), device=device)


class LognormalIndices:
    """iCT's discretised lognormal over grid intervals: ``p(j) ~ erf((ln s_j - P_mean) /
    (sqrt(2) P_std)) - erf((ln s_{j+1} - P_mean)/(sqrt(2) P_std))``; P_mean = -1.1, P_std = 2."""

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0) -> None:
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def __call__(self, sigmas: Tensor, batch_size: int, device: torch.device) -> Tensor:
        z = (sigmas.double().log() - self.P_mean) / (math.sqrt(2) * self.P_std)
        probs = (torch.erf(z[:-1]) - torch.erf(z[1:])).clamp_min(0)
        return torch.multinomial(probs.float(), batch_size, replacement=True).to(device)


class _ConsistencyLoss:
    def __init__(
        self,
        metric: Metric,
        weighting: Callable[[Tensor, Tensor], Tensor] | None = None,
        index_sampler: Callable[[Tensor, int, torch.device], Tensor] | None = None,
    ) -> None:
        self.metric = metric
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.index_sampler = index_sampler if index_sampler is not None else UniformIndices()

    def target_input(
        self,
        images: Tensor,
        noise: Tensor,
        x_t: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        class_labels: Tensor | None,
        **cond: Tensor,
    ) -> Tensor:
        raise NotImplementedError

    def conditioning(
        self, batch: int, device: torch.device, shard: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Extra inputs of the online and target models (guided CD: ``{"guidance": w [B]}``),
        drawn after the noise so unguided objectives keep their random stream."""
        return {}

    def __call__(
        self,
        online: ConsistencyFn,
        target: ConsistencyFn,
        images: Tensor,
        sigmas: Tensor,
        class_labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> ConsistencyLossOutput:
        """Args:
            online: f_theta, called with gradients. target: f_theta^-, called under no_grad.
            images: ``[B,C,H,W]`` clean data in [-1,1]. sigmas: ``[N]`` descending grid.
            shard: ``(rank, world_size)``: noise levels and noise are drawn for the global
                batch and sliced, so a DDP step sees what one process with the global batch sees.
        Returns: :class:`ConsistencyLossOutput` with ``loss [B]``.
        """
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(
                f"sigmas must be a 1-D grid with >= 2 levels, got {tuple(sigmas.shape)}"
            )
        sigmas = sigmas.to(images.device)
        b = images.shape[0]
        idx = global_draw(lambda n: self.index_sampler(sigmas, n, images.device), b, shard)
        sigma, sigma_next = sigmas[idx], sigmas[idx + 1]
        noise = global_draw(
            lambda n: torch.randn(
                (n, *images.shape[1:]), device=images.device, dtype=images.dtype
            ),
            b,
            shard,
        )
        x_t = images + append_dims(sigma, images.ndim).to(images.dtype) * noise
        cond = self.conditioning(b, images.device, shard)
        with torch.no_grad():
            x_hat = self.target_input(images, noise, x_t, sigma, sigma_next, class_labels, **cond)
        # The target pass runs first, on a replay of the RNG state the online pass then uses
        # (same dropout masks, same stream afterwards): run second, it would allocate its
        # activations next to the online pass's saved ones, doubling the step's page faults
        # on the CPU (benchmarks/training_and_sampling.py: CT step 1.11 -> 1.0x of bare passes).
        with replay_rng(images.device) as replay:
            with torch.no_grad(), replay():
                tgt = target(x_hat, sigma_next, class_labels, **cond)
            pred = online(x_t, sigma, class_labels, **cond)
        loss = self.weighting(sigma, sigma_next) * self.metric(pred, tgt.detach())
        return ConsistencyLossOutput(
            loss=loss, sigma=sigma, sigma_next=sigma_next, guidance=cond.get("guidance")
        )


class ConsistencyDistillationLoss(_ConsistencyLoss):
    """CD (CM paper Alg. 2): ``x_hat = solver(teacher, x_t, sigma, sigma_next)``, one Euler or
    Heun step of the teacher's PF-ODE (CIFAR-10: Heun, N = 18, LPIPS, lambda = 1).

    Guided CD (``guidance``; LCM, Luo et al. 2023, Eq. 9; Meng et al. 2023): per sample a
    scale ``w ~ guidance``; the teacher step uses the classifier-free-guided denoiser
    ``D_w = D_u + w (D_c - D_u)`` (:class:`cmexp.diffusion.guidance.GuidedDenoiser`, 2 passes
    per evaluation) and the online and target students are called with ``guidance=w``, so one
    student learns every scale of the range. With w = 1 it is plain conditional CD.

    Args:
        metric: d(x, y) -> ``[B]``. solver: ``euler_step`` or ``heun_step``.
        teacher: the frozen EDM denoiser D(x, sigma); may also be given per call.
        weighting: lambda(sigma, sigma_next) -> ``[B]`` (default 1).
        guidance: a :class:`GuidanceRange` (guided CD; needs class labels and a
            class-conditional teacher trained with label dropout), or None.
    """

    def __init__(
        self,
        metric: Metric,
        solver: Solver,
        teacher: Denoiser | None = None,
        weighting: Callable[[Tensor, Tensor], Tensor] | None = None,
        index_sampler: Callable[[Tensor, int, torch.device], Tensor] | None = None,
        guidance: GuidanceRange | None = None,
    ) -> None:
        super().__init__(metric, weighting, index_sampler)
        self.solver = solver
        self.teacher = teacher
        self.guidance = guidance

    def conditioning(
        self, batch: int, device: torch.device, shard: tuple[int, int]
    ) -> dict[str, Tensor]:  # noqa: D102
        if self.guidance is None:
            return {}
        guidance = self.guidance
        return {"guidance": global_draw(lambda n: guidance(n, device), batch, shard)}

    def target_input(self, images, noise, x_t, sigma, sigma_next, class_labels, **cond):  # noqa: D102
        if self.teacher is None:
            raise ValueError("ConsistencyDistillationLoss needs a teacher denoiser (teacher=None)")
        teacher = self.teacher
        if "guidance" in cond:
            if class_labels is None:
                raise ValueError(
                    "guided CD (model.loss.guidance) needs class labels: set dataset.use_labels=true "
                    "and distil a class-conditional teacher"
                )
            teacher = GuidedDenoiser(self.teacher, cond["guidance"])
        return self.solver(teacher, x_t, sigma, sigma_next, class_labels)


class ConsistencyTrainingLoss(_ConsistencyLoss):
    """CT (CM paper Alg. 3): no teacher, ``x_hat = x + sigma_next z`` with the same z as
    ``x_t = x + sigma z`` (the Euler step with the unbiased score estimate (x - x_t)/sigma^2)."""

    def target_input(self, images, noise, x_t, sigma, sigma_next, class_labels, **cond):  # noqa: D102
        return images + append_dims(sigma_next, images.ndim).to(images.dtype) * noise
