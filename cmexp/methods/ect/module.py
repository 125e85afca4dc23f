"""Easy consistency tuning (ECT, Geng et al. 2025): a consistency model tuned from a pretrained
EDM denoiser with a continuous-time gap that shrinks stage by stage (``cmexp.losses.ECTLoss``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.precond import ECTPrecond
from cmexp.inference.checkpoint import read_checkpoint
from cmexp.inference.plan import SamplingSpec
from cmexp.methods.ect.loss import ECTLoss
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory, check_taus
from cmexp.training.teacher import (
    CONSISTENCY_INIT_KINDS,
    check_preconditioning,
    init_from_consistency_model,
    load_teacher,
)


class ECTLitModule(DiffusionLitModule):
    """ECT: online network initialised from an EDM teacher, target = the online network itself
    under stop-grad (no target EMA), sampling EMA ``ema`` for samples and checkpoints.

    Args:
        net: raw network with the teacher's architecture. loss: :class:`ECTLoss`.
        teacher_path: the model ECT starts from; its sampling-EMA weights initialise the
            online network, the sampling EMA, and nothing else (ECT has no teacher after
            initialisation). An EDM checkpoint of this suite, ``zoo:NAME`` or a converted
            EDM file (ECT's "tuning from a diffusion model"), or a consistency model to
            fine-tune: an ECT/CD/CT checkpoint of this suite or a released CD/CT file that
            :mod:`cmexp.interop` reads (e.g. openai/consistency_models_cifar10's
            ``ct-lpips/checkpoints/checkpoint_74``). A CD/CT model was trained with the
            boundary scalings, so the run must use them too (``model/precond=cm``).
        double_kimg: images (thousands) per stage; the gap t - r shrinks by q each stage
            (ECT CIFAR-10: 3,200 kimg = 25k iterations at batch 128).
        precond: ``ECTPrecond`` (sigma_min: eps of the sampling boundary condition, ECT 0.003;
            ``edm_scalings_in_training``: EDM's c_skip/c_out while training, the boundary
            scalings only at sampling time).
        num_scales: N of the Karras grid whose levels ``cmexp.tau_search`` indexes (ECT itself
            has no grid).
        taus: default levels after T for multistep sampling (ECT CIFAR-10 2-step: 0.821;
            ECT re-noises with ``tau z``, Alg. 1 with ``sqrt(tau^2 - eps^2) z``: a factor
            1 - 7e-6 apart at tau = 0.821, eps = 0.003; this suite samples every model with Alg. 1).
    """

    kind = "ect"

    def __init__(
        self,
        net: nn.Module,
        loss: ECTLoss,
        optimizer: OptimizerFactory,
        teacher_path: str | None = None,
        double_kimg: float = 3200.0,
        precond: PrecondFactory = ECTPrecond,
        rho: float = 7.0,
        num_scales: int = 18,
        taus: Sequence[float] = (0.821,),
        **base: Any,
    ) -> None:
        super().__init__(optimizer, **base)
        if not double_kimg > 0:
            raise ValueError(
                f"model.double_kimg must be > 0 (thousands of images per stage), got {double_kimg!r}"
            )
        self.model = precond(net)
        if (
            teacher_path
            and read_checkpoint(
                teacher_path, "model.teacher_path", ("edm", *CONSISTENCY_INIT_KINDS)
            ).kind
            in CONSISTENCY_INIT_KINDS
        ):
            self.teacher_path = init_from_consistency_model(
                self.model,
                teacher_path,
                "model.teacher_path",
                "ECT starts from an EDM denoiser or a consistency model",
            )
        else:
            teacher = load_teacher(teacher_path, net)
            check_preconditioning(self.model, teacher, teacher_path)
            self.model.net.load_state_dict(teacher.net.state_dict())
            self.teacher_path = str(getattr(teacher, "source_path", teacher_path))
        self._init_ema()
        ema_update_(self.ema, self.model, 0.0)
        self.loss = loss
        self.double_kimg = float(double_kimg)
        self.rho = float(rho)
        self.num_scales = int(num_scales)
        self.taus = check_taus(taus, self.model)

    def stage_at(self, kimg: float) -> int:
        """The ECT stage after ``kimg`` thousand images: ``floor(kimg / double_kimg)``."""
        return int(kimg // self.double_kimg)

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        kimg = self.batches_seen * self.global_batch_size(images.shape[0]) / 1000
        self.loss.stage = self.stage_at(kimg)
        out = self.loss(self.model, images, labels, shard=self.shard())
        zero = float((out.sigma_next == 0).float().mean())
        return out.loss.mean(), {"stage": self.loss.stage, "r_zero_fraction": zero}

    def sampling_spec(self) -> SamplingSpec:
        return self.consistency_spec(self.num_scales)

    @contextlib.contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """Samples use the boundary scalings (``f(x, sigma_min) = x``): the sampling EMA in
        eval mode while they are drawn."""
        was_training = self.ema.training
        self.ema.eval()
        try:
            yield
        finally:
            self.ema.train(was_training)

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "teacher_path": self.teacher_path,
            "double_kimg": self.double_kimg,
        }
