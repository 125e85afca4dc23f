"""Consistency distillation (CD, Alg. 2) and consistency training (CT, Alg. 3) modules.

Three copies of the consistency function live here and are never the same object:
``model`` (online theta, trained), ``target`` (theta^-, updated with rate mu(k) after every
optimizer step, enters the loss) and ``ema`` (sampling EMA with ``ema_decay``, used for
samples and metrics). The CD teacher is frozen and kept out of checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.karras import karras_sigmas
from cmexp.diffusion.precond import CMPrecond, EDMPrecond
from cmexp.diffusion.schedules import Schedule, check_mu
from cmexp.inference.plan import SamplingSpec
from cmexp.methods.consistency.loss import ConsistencyDistillationLoss, ConsistencyTrainingLoss
from cmexp.training.base import (
    DiffusionLitModule,
    OptimizerFactory,
    PrecondFactory,
    check_taus,
    frozen_copy,
)
from cmexp.training.teacher import (
    check_preconditioning,
    check_same_network,
    load_teacher,
    load_teacher_weights,
)


class ConsistencyLitModule(DiffusionLitModule):
    """Shared CD/CT training logic.

    Args:
        net: raw network. loss: CD or CT objective. schedule: ``step -> (N, mu)``
            (``FixedSchedule`` or ``AdaptiveSchedule``).
        precond: the consistency function's wrapper (``CMPrecond``: sigma_min = eps 0.002,
            sigma_max = T 80, sigma_data 0.5, c_noise_scale 0.25; CM paper App. C).
        taus: noise levels of multistep sampling after the first step (the 2-step tau;
            CIFAR-10 CD: 0.585 = grid index 11 of N = 18); stored in checkpoints as the
            model's default taus.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: ConsistencyDistillationLoss | ConsistencyTrainingLoss,
        schedule: Schedule,
        optimizer: OptimizerFactory,
        precond: PrecondFactory = CMPrecond,
        rho: float = 7.0,
        taus: Sequence[float] = (0.585,),
        **base: Any,
    ) -> None:
        super().__init__(optimizer, **base)
        self.model = precond(net)
        self.target = frozen_copy(self.model)
        self._init_ema()
        self.loss = loss
        self.schedule = schedule
        self.rho = float(rho)
        self.taus = check_taus(taus, self.model)
        self._mu = schedule(0)[1]
        check_mu(self._mu)

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        num_scales, mu = self.schedule(self.global_step)
        check_mu(mu)
        self._mu = mu
        m = self.model
        sigmas = karras_sigmas(
            num_scales, m.sigma_min, m.sigma_max, self.rho, device=images.device
        )
        out = self.loss(self.model, self.target, images, sigmas, labels, shard=self.shard())
        return out.loss.mean(), {"num_scales": num_scales, "mu": mu}

    def after_optimizer_step(self) -> None:
        ema_update_(self.target, self.model, self._mu)
        super().after_optimizer_step()

    def sampling_spec(self) -> SamplingSpec:
        """Sigma range, rho, the grid N of the current step and the default taus."""
        return self.consistency_spec(self.schedule(self.global_step)[0])


class CTLitModule(ConsistencyLitModule):
    """Consistency training: random init, no teacher (CM paper Alg. 3, Table 3)."""

    kind = "ct"


class CDLitModule(ConsistencyLitModule):
    """Consistency distillation from an EDM teacher trained by this suite (CM paper Alg. 2).

    The teacher is rebuilt from ``teacher_path`` (its sampling-EMA weights), frozen, in eval
    mode, and not registered as a submodule, so CD checkpoints never contain it. The online,
    target and sampling-EMA networks start from the teacher's EMA weights (App. C).
    """

    kind = "cd"

    def __init__(
        self,
        *args: Any,
        teacher_path: str | None = None,
        init_from_teacher: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.loss, ConsistencyDistillationLoss):
            raise ValueError("model.loss of a CD run must be a ConsistencyDistillationLoss")
        guidance = getattr(self.loss, "guidance", None)
        if guidance is not None:
            if self.label_dim == 0:
                raise ValueError(
                    "model.loss.guidance (guided CD) needs a class-conditional student and teacher: set "
                    "dataset.use_labels=true (net.label_dim = dataset.num_classes)"
                )
            if getattr(self.model.net, "guidance_embed", None) is None:
                raise ValueError(
                    "model.loss.guidance (guided CD) needs a student that takes w: set net.guidance_embed=true"
                )
        teacher = load_teacher(teacher_path, self.model.net, init_from_teacher)
        if isinstance(
            teacher, EDMPrecond
        ):  # VP/VE-SDE teachers of NVlabs/edm: no weights are shared
            check_preconditioning(self.model, teacher, teacher_path)
        self.attach_teacher(teacher)
        self.loss.teacher = teacher
        if init_from_teacher:
            if getattr(
                teacher, "own_net", False
            ):  # a converted foreign teacher built from its own config
                check_same_network(self.model.net, teacher.net, teacher_path)
            load_teacher_weights(self.model.net, teacher.net)
            ema_update_(self.target, self.model, 0.0)
            ema_update_(self.ema, self.model, 0.0)

    def metadata(self) -> dict[str, Any]:
        guidance = getattr(self.loss, "guidance", None)
        return {
            **super().metadata(),
            "teacher_path": self.teacher_path,
            **({"guidance": guidance.describe()} if guidance is not None else {}),
        }

    def sampling_meta(self) -> dict[str, Any]:
        """A guided student samples at its recorded default scale (``guidance.sample``)."""
        guidance = getattr(self.loss, "guidance", None)
        return {"guidance": guidance.describe()} if guidance is not None else {}

    @property
    def teacher_path(self) -> str:
        return getattr(self.teacher, "source_path", "")
