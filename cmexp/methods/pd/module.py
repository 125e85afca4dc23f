"""Progressive distillation (Salimans & Ho 2022, Alg. 2) of an EDM teacher trained by this suite:
the CM paper's main distillation baseline (Fig. 4, Tables 1-2).

Round k trains a student with ``N_k = teacher_steps / 2^(k+1)`` DDIM steps to match two DDIM
steps of its round teacher (:class:`cmexp.losses.ProgressiveDistillationLoss`); the round-0
teacher is the EDM teacher (``teacher_steps`` DDIM steps on the Karras grid), the teacher of
round k > 0 is the student of round k - 1, and every round's student starts from its teacher
(Alg. 2: "init student from teacher"). Rounds halve the step count down to
``teacher_steps / 2^num_rounds`` (1 by default). At each round start the optimizer state is
reset and, with ``anneal_lr``, the learning rate decays linearly to 0 over the round (both
reference implementations).

Three copies of the denoiser live here: ``model`` (the student, trained), ``round_teacher``
(frozen, saved in every checkpoint so a resume in the middle of a round continues exactly) and
``ema`` (sampling EMA; the PD papers use none, ``ema_decay = 0``: then it equals the student).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.karras import karras_sigmas
from cmexp.diffusion.precond import EDMPrecond
from cmexp.inference.plan import SamplingSpec
from cmexp.methods.pd.loss import ProgressiveDistillationLoss
from cmexp.methods.pd.rules import check_rounds
from cmexp.training.base import DiffusionLitModule, OptimizerFactory, PrecondFactory, frozen_copy
from cmexp.training.teacher import check_preconditioning, load_teacher


class PDLitModule(DiffusionLitModule):
    """Progressive distillation rounds over one Lightning run.

    Args:
        net: raw network, the teacher run's architecture.
        loss: :class:`ProgressiveDistillationLoss` (metric d, weighting: truncated SNR or
            SNR + 1 = the v-target).
        teacher_path: the EDM teacher (``last.ckpt`` of ``+experiment=*_edm``); its EMA weights
            are the round-0 teacher and (``init_from_teacher``) the first student.
        teacher_steps: DDIM steps of the round-0 teacher on the Karras grid (PD paper and the CM
            paper's PD: 8192; the first student takes half).
        num_rounds: halvings (null: down to 1 step); more than log2(teacher_steps) is an error.
        steps_per_round: optimizer steps of each round, one integer or one per round (PD: 50k).
        anneal_lr: linear decay of the learning rate to 0 within each round.
        ema_decay: sampling EMA (0 in both PD references: the student itself).
        precond: the student's wrapper (``EDMPrecond`` with the teacher's constants).
    """

    kind = "pd"

    def __init__(
        self,
        net: nn.Module,
        loss: ProgressiveDistillationLoss,
        optimizer: OptimizerFactory,
        teacher_path: str | None = None,
        teacher_steps: int = 8192,
        num_rounds: int | None = None,
        steps_per_round: int | Sequence[int] = 50000,
        anneal_lr: bool = True,
        init_from_teacher: bool = True,
        precond: PrecondFactory = EDMPrecond,
        rho: float = 7.0,
        **base: Any,
    ) -> None:
        super().__init__(optimizer, **{"ema_decay": 0.0, **base})  # PD: no EMA by default
        self.teacher_steps, self.num_rounds, self.round_lengths = check_rounds(
            teacher_steps, num_rounds, steps_per_round
        )
        self.round_starts = [sum(self.round_lengths[:k]) for k in range(self.num_rounds)]
        self.anneal_lr = bool(anneal_lr)
        self.loss = loss
        self.rho = float(rho)
        self.model = precond(net)
        teacher = load_teacher(teacher_path, self.model.net)
        check_preconditioning(self.model, teacher, teacher_path)
        self.teacher_path = str(getattr(teacher, "source_path", teacher_path))
        self.round_teacher = frozen_copy(self.model)  # a submodule: saved in checkpoints
        self.round_teacher.load_state_dict(teacher.state_dict())
        self.round_teacher.eval()
        if init_from_teacher:
            self.model.load_state_dict(teacher.state_dict())
        self._init_ema()
        self.teacher_round = 0  # the round whose teacher round_teacher holds

    def train(self, mode: bool = True) -> PDLitModule:
        """Train/eval mode for the student; the round teacher stays in eval mode (no dropout)."""
        super().train(mode)
        self.round_teacher.eval()
        return self

    # ---------------------------------------------------------------- rounds
    @property
    def total_steps(self) -> int:
        return sum(self.round_lengths)

    def round_at(self, step: int) -> int:
        """The round optimizer step ``step`` (0-based) belongs to (the last one after the end)."""
        k = 0
        while k + 1 < self.num_rounds and step >= self.round_starts[k + 1]:
            k += 1
        return k

    def student_steps(self, k: int) -> int:
        """DDIM steps of round k's student: ``teacher_steps / 2^(k+1)``."""
        return self.teacher_steps // 2 ** (k + 1)

    def start_round(self, k: int) -> None:
        """The student of round k-1 (its sampling-EMA weights) becomes round k's teacher and its
        student's starting point; the optimizer state is reset (fresh Adam moments)."""
        with torch.no_grad():
            self.round_teacher.load_state_dict(self.ema.state_dict())
            self.model.load_state_dict(self.ema.state_dict())
        if self._trainer is not None:
            for opt in self.trainer.optimizers:
                opt.state.clear()
        self.teacher_round = k

    def compute_loss(
        self, images: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        k = self.round_at(self.global_step)
        if k != self.teacher_round:
            self.start_round(k)
        n = self.student_steps(k)
        m = self.model
        sigmas = karras_sigmas(2 * n + 1, m.sigma_min, m.sigma_max, self.rho, device=images.device)
        out = self.loss(self.model, self.round_teacher, images, sigmas, labels, shard=self.shard())
        return out.loss.mean(), {"round": k, "student_steps": n}

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(
            params=[p for p in self.model.parameters() if p.requires_grad]
        )

        def factor(step: int) -> float:
            k = self.round_at(step)
            f = (
                1.0 - (step - self.round_starts[k]) / self.round_lengths[k]
                if self.anneal_lr
                else 1.0
            )
            if self.lr_warmup_kimg > 0:
                batch = self.trainer.datamodule.batch_size if self.trainer.datamodule else 1
                kimg = (
                    step
                    * self.global_batch_size(batch)
                    * self.trainer.accumulate_grad_batches
                    / 1000
                )
                f *= min(kimg / self.lr_warmup_kimg, 1.0)
            return max(f, 0.0)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- sampling
    def trained_steps(self) -> int:
        """DDIM steps the current weights were trained for: the round of the last optimizer
        step (a checkpoint at a round's end describes that round's student)."""
        return self.student_steps(self.round_at(max(self.global_step - 1, 0)))

    def sampling_spec(self) -> SamplingSpec:
        """Its own DDIM plan: N steps on the N + 1 Karras levels sigma_max ... sigma_min."""
        m = self.model
        return SamplingSpec(
            family="denoiser",
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            rho=self.rho,
            num_scales=self.trained_steps() + 1,
            sampler="ddim",
            final_zero=False,
        )

    # ---------------------------------------------------------------- checkpoints
    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "teacher_path": self.teacher_path,
            "pd_round": self.teacher_round,
            "teacher_steps": self.teacher_steps,
            "steps_per_round": list(self.round_lengths),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint["cmexp"]
        if (
            list(meta.get("steps_per_round", self.round_lengths)) != self.round_lengths
            or int(meta.get("teacher_steps", self.teacher_steps)) != self.teacher_steps
        ):
            raise ValueError(
                "ckpt_path was trained with model.teacher_steps="
                f"{meta.get('teacher_steps')} and model.steps_per_round={meta.get('steps_per_round')}; "
                "resume with the same rounds"
            )
        self.teacher_round = int(meta["pd_round"])
