"""Consistency distillation (CD, Alg. 2) and consistency training (CT, Alg. 3) modules.

Three copies of the consistency function live here and are never the same object:
``model`` (online theta, trained), ``target`` (theta^-, updated with rate mu(k) after every
optimizer step, enters the loss) and ``ema`` (sampling EMA with ``ema_decay``, used for
samples and metrics). The CD teacher is frozen and kept out of checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cmexp.diffusion.ema import ema_update_
from cmexp.diffusion.guidance import ScaleConditioned
from cmexp.diffusion.karras import karras_sigmas
from cmexp.diffusion.precond import CMPrecond, EDMPrecond
from cmexp.diffusion.sampling import SeededNoise, sample_multistep
from cmexp.diffusion.schedules import Schedule, check_mu
from cmexp.inference.checkpoint import read_checkpoint
from cmexp.inference.plan import SamplingSpec, sigma_plan
from cmexp.losses.consistency import ConsistencyDistillationLoss, ConsistencyTrainingLoss
from cmexp.modules.base import DiffusionLitModule, OptimizerFactory, frozen_copy


class ConsistencyLitModule(DiffusionLitModule):
    """Shared CD/CT training logic.

    Args:
        net: raw network. loss: CD or CT objective. schedule: ``step -> (N, mu)``
            (``FixedSchedule`` or ``AdaptiveSchedule``).
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
        ema_decay: float = 0.9999,
        lr_warmup_kimg: float = 0.0,
        compile_net: bool = False,
        channels_last: bool = False,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        c_noise_scale: float = 0.25,
        taus: Sequence[float] = (0.585,),
    ) -> None:
        super().__init__(optimizer, ema_decay, lr_warmup_kimg, compile_net, channels_last)
        self.model = CMPrecond(net, sigma_min, sigma_max, sigma_data, c_noise_scale)
        self.target = frozen_copy(self.model)
        self._init_ema()
        self.loss = loss
        self.schedule = schedule
        self.rho = float(rho)
        self.taus = tuple(float(t) for t in taus)
        for t in self.taus:
            if not sigma_min < t < sigma_max:
                raise ValueError(f"model.taus entries must lie in (sigma_min, sigma_max), got {t}")
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
        m = self.model
        return SamplingSpec(
            consistency=True,
            sigma_min=m.sigma_min,
            sigma_max=m.sigma_max,
            rho=self.rho,
            num_scales=int(self.schedule(self.global_step)[0]),
            taus=self.taus,
        )

    def sampling_model(self) -> nn.Module:
        """The sampling-EMA consistency function that sample grids use (guided students: at
        their default scale)."""
        return self.ema

    @torch.no_grad()
    def sample_images(
        self, num: int, seed: int = 0, steps: Sequence[int] = (1, 2)
    ) -> dict[str, Tensor]:
        return consistency_samples(self, self.sampling_model(), num, seed, steps)


@torch.no_grad()
def consistency_samples(
    module: DiffusionLitModule,
    model: nn.Module,
    num: int,
    seed: int = 0,
    steps: Sequence[int] = (1, 2),
) -> dict[str, Tensor]:
    """In-training samples of a consistency model (CM paper Alg. 1): for each k in ``steps``,
    ``num`` images ``[num, C, H, W]`` from seeds ``seed..seed+num-1`` at ``sigma_plan(k)``,
    under key ``"{k}step"``; a class-conditional module samples image i with class
    ``i mod label_dim`` (``module.grid_labels``)."""
    spec = module.sampling_spec()
    shape = (model.img_channels, model.img_resolution, model.img_resolution)
    labels = module.grid_labels(num)
    out: dict[str, Tensor] = {}
    for k in steps:
        noise = SeededNoise(range(seed, seed + num), module.device)
        z = noise.randn(shape)
        out[f"{k}step"] = sample_multistep(
            model,
            z,
            sigma_plan(spec, steps=k),
            spec.sigma_min,
            class_labels=labels,
            noise=noise.randn_like,
        )
    return out


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
        self._teacher = [teacher]  # a list keeps it out of state_dict() and parameters()
        self.loss.teacher = teacher
        if init_from_teacher:
            if getattr(
                teacher, "own_net", False
            ):  # a converted foreign teacher built from its own config
                check_same_network(self.model.net, teacher.net, teacher_path)
            load_teacher_weights(self.model.net, teacher.net)
            ema_update_(self.target, self.model, 0.0)
            ema_update_(self.ema, self.model, 0.0)

    @property
    def teacher(self) -> EDMPrecond:
        return self._teacher[0]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "CDLitModule":
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def metadata(self) -> dict[str, Any]:
        guidance = getattr(self.loss, "guidance", None)
        return {
            **super().metadata(),
            "teacher_path": self.teacher_path,
            **({"guidance": guidance.describe()} if guidance is not None else {}),
        }

    def sampling_model(self) -> nn.Module:
        guidance = getattr(self.loss, "guidance", None)
        return self.ema if guidance is None else ScaleConditioned(self.ema, guidance.sample)

    @property
    def teacher_path(self) -> str:
        return getattr(self.teacher, "source_path", "")


PRECOND_KEYS = ("sigma_max", "sigma_data", "c_noise_scale")


def load_teacher_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Copy a teacher's raw-network weights into a student of the same architecture; a guided
    student's w embedding (``guidance_embed.*``, zero-initialised) is the only part the teacher
    may lack, so the student starts as exactly the teacher for every w."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    extra = [k for k in missing if not k.startswith("guidance_embed.")]
    if extra or unexpected:
        raise RuntimeError(
            f"student and teacher weights differ: missing {extra}, unexpected {list(unexpected)}"
        )


def check_preconditioning(
    student: nn.Module, teacher: nn.Module, teacher_path: str | None
) -> None:
    """A CD student starts from its teacher's weights, so it must feed them the same inputs:
    a ValueError naming every ``model.*`` key whose value differs from the teacher's."""
    diff = [
        k
        for k in PRECOND_KEYS
        if abs(float(getattr(student, k)) - float(getattr(teacher, k))) > 1e-12
    ]
    if diff:
        got = ", ".join(f"model.{k}={getattr(student, k)}" for k in diff)
        want = ", ".join(f"{k}={getattr(teacher, k)}" for k in diff)
        raise ValueError(
            f"model.teacher_path={teacher_path} was trained with {want} but this run sets {got}; "
            "the student starts from the teacher's weights: use the teacher's values"
        )


def check_same_network(student: nn.Module, teacher: nn.Module, teacher_path: str | None) -> None:
    """A student that starts from a converted teacher's weights must compute what the teacher
    computes: the same parameter names and shapes, and the same output on a fixed input with
    the teacher's weights (settings such as a resampling filter or an embedding's spacing hold
    no weights). A ValueError naming ``model.teacher_path`` and ``net`` otherwise."""
    import copy

    mine, theirs = student.state_dict(), teacher.state_dict()
    diff = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k].shape != theirs[k].shape]
    probe = copy.deepcopy(student).eval() if not diff else None
    if probe is not None:
        probe.load_state_dict(theirs)
        gen = torch.Generator().manual_seed(0)
        shape = (
            1,
            int(teacher.img_channels),
            int(teacher.img_resolution),
            int(teacher.img_resolution),
        )
        x = torch.randn(shape, generator=gen).to(next(teacher.parameters()).device)
        with torch.no_grad():
            same = torch.allclose(
                probe(x, torch.tensor([0.5]), None),
                teacher(x, torch.tensor([0.5]), None),
                atol=1e-5,
            )
        if same:
            return
    what = (
        f"its weights differ at {diff[0]}"
        if diff
        else "with the teacher's weights it computes something else"
    )
    raise ValueError(
        f"model.teacher_path={teacher_path}: the run's net is not the teacher's architecture ({what}); "
        "use the net the teacher was converted to (see docs/interop.md) or model.init_from_teacher=false"
    )


def load_teacher(path: str | None, net: nn.Module, init_from_teacher: bool = True) -> nn.Module:
    """Rebuild a frozen EDM teacher from a cmexp EDM checkpoint's sampling-EMA weights, or from
    a converted NVlabs/edm pickle or openai/consistency_models ``edm_*.pt`` (built from its own
    recorded architecture, ``teacher.own_net = True``; ``cmexp.interop``).

    Args:
        path: ``model.teacher_path``, a ``.ckpt`` written by ``+experiment=*_edm`` (or a zoo name).
        net: a raw network with the teacher's architecture (the run's ``net`` group); it is
            deep-copied, not modified.
        init_from_teacher: the student will start from the teacher's weights (VP/VE-SDE
            teachers, whose networks take other inputs, are refused then).
    """
    if not path:
        raise ValueError(
            "model.teacher_path is required for consistency distillation: set "
            "model.teacher_path=/path/to/last.ckpt of an EDM run (e.g. +experiment=fmnist_edm)"
        )
    ckpt = read_checkpoint(path, key="model.teacher_path", kinds=("edm",))
    meta = ckpt.meta
    precond = (meta.get("precond") or {"name": "edm"}).get("name")
    if precond in ("vp_sde", "ve_sde") and init_from_teacher:
        raise ValueError(
            f"model.teacher_path={path} is {meta.get('source_network', precond)} (c_noise and output of the "
            f"{precond.split('_')[0].upper()} SDE); a student cannot start from its weights: set "
            "model.init_from_teacher=false (or use an EDMPrecond teacher)"
        )
    if precond != "edm" and precond not in ("vp_sde", "ve_sde"):
        raise ValueError(
            f"model.teacher_path={path} is a '{precond}'-preconditioned teacher (model=edm_vp); distillation "
            "here needs an EDM-preconditioned one (model=edm)"
        )
    want = (int(net.img_resolution), int(net.img_channels))
    got = (int(meta["img_resolution"]), int(meta["img_channels"]))
    if want != got:
        raise ValueError(
            f"model.teacher_path={path} is a {got[1]}-channel {got[0]}x{got[0]} teacher but this run "
            f"uses dataset.resolution={want[0]}, dataset.channels={want[1]}"
        )
    classes = int(meta.get("label_dim", getattr(net, "label_dim", 0)) or 0)
    if classes != int(getattr(net, "label_dim", 0) or 0):
        raise ValueError(
            f"model.teacher_path={path} is a teacher with {classes} classes (0 = unconditional) but this run's "
            f"net has net.label_dim={int(getattr(net, 'label_dim', 0) or 0)}"
        )
    if meta.get("source_format"):  # converted: its own architecture, weights under "ema."
        from cmexp.inference.loader import build_model

        teacher = build_model(ckpt, "ema.").requires_grad_(False)
        teacher.own_net = True
        teacher.eval()
        teacher.source_path = str(ckpt.path)
        return teacher
    teacher = frozen_copy(
        EDMPrecond(
            net, meta["sigma_min"], meta["sigma_max"], meta["sigma_data"], meta["c_noise_scale"]
        )
    )
    if (
        getattr(teacher.net, "guidance_embed", None) is not None
    ):  # a guided student's net: the teacher takes no w
        teacher.net.guidance_embed = None
    try:
        teacher.load_state_dict(ckpt.weights("ema."))
    except RuntimeError as err:
        raise ValueError(
            f"model.teacher_path={path}: the teacher's weights do not fit the run's net config; "
            f"use the same net as the teacher run ({str(err).splitlines()[0]})"
        ) from None
    teacher.eval()
    teacher.source_path = str(ckpt.path)
    return teacher
