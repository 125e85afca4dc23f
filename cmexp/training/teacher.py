"""Loading a frozen diffusion teacher for the methods that distil or tune one (CD, ECT, PD,
sCD, ...): rebuilt from a cmexp EDM checkpoint (or a converted NVlabs/edm or
openai/consistency_models file, ``cmexp.interop``), checked against the student's
preconditioning and architecture, and its weights copied into a student."""

from __future__ import annotations

import torch
from torch import nn

from cmexp.diffusion.precond import ECTPrecond, EDMPrecond
from cmexp.inference.checkpoint import read_checkpoint
from cmexp.training.base import frozen_copy

PRECOND_KEYS = ("sigma_max", "sigma_data", "c_noise_scale")
#: The checkpoint kinds a consistency model may start from (TCM's stage 1, ECT fine-tuning a
#: released CD/CT model): consistency models of this suite or read by cmexp.interop.
CONSISTENCY_INIT_KINDS = ("ect", "cd", "ct")
_INIT_CONSTANTS = ("sigma_min", "sigma_max", "sigma_data", "c_noise_scale")


def _edm_in_training(model: nn.Module) -> bool:
    return isinstance(model, ECTPrecond) and model.edm_scalings_in_training


def init_from_consistency_model(model: nn.Module, path: str | None, key: str, purpose: str) -> str:
    """Copy a consistency model's sampling-EMA raw-network weights into ``model`` (a
    consistency wrapper), after checking that the two compute the same function: the same
    ``sigma_min``, ``sigma_max``, ``sigma_data`` and ``c_noise_scale``, the same scalings in
    training (an ECT checkpoint: EDM's, ``model/precond=ect``; CD/CT: the boundary scalings,
    ``model/precond=cm``) and the same network. A ValueError naming ``key`` otherwise.

    Args:
        path: a cmexp ECT/CD/CT checkpoint, ``zoo:NAME``, or a released CD/CT file that
            :mod:`cmexp.interop` reads (openai/consistency_models_cifar10's Flax checkpoints).
        key: the config key that named it (``model.stage1_path``, ``model.teacher_path``).
        purpose: why a consistency model is needed, named when the kind is wrong.
    Returns: the resolved path.
    """
    from cmexp.inference.loader import load_model

    init = load_model(path, key=key, kinds=CONSISTENCY_INIT_KINDS, purpose=purpose)
    if (init.kind == "ect") != _edm_in_training(model):
        want = "model/precond=ect" if init.kind == "ect" else "model/precond=cm"
        raise ValueError(
            f"{key}={path} is a '{init.kind}' model, trained with "
            f"{'EDM' if init.kind == 'ect' else 'the boundary'} scalings; the student must "
            f"train with the same: use {want}"
        )
    check_preconditioning(model, init.model, path, _INIT_CONSTANTS, key=key, whose="its")
    try:
        model.net.load_state_dict(init.net.state_dict())
    except RuntimeError as err:
        raise ValueError(
            f"{key}={path}: its weights do not fit the run's net config; use its net "
            f"({str(err).splitlines()[0]})"
        ) from None
    return str(init.path)


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
    student: nn.Module,
    teacher: nn.Module,
    teacher_path: str | None,
    keys: tuple[str, ...] = PRECOND_KEYS,
    key: str = "model.teacher_path",
    whose: str = "the teacher's",
) -> None:
    """A student that starts from its teacher's weights must feed them the same inputs: a
    ValueError naming every ``model.precond.*`` key (of ``keys``) whose value differs from
    the teacher's (``key``: the config key that named the teacher; ``whose``: how the error
    refers to it)."""
    diff = [
        k for k in keys if abs(float(getattr(student, k)) - float(getattr(teacher, k))) > 1e-12
    ]
    if diff:
        got = ", ".join(f"model.precond.{k}={getattr(student, k)}" for k in diff)
        want = ", ".join(f"{k}={getattr(teacher, k)}" for k in diff)
        raise ValueError(
            f"{key}={teacher_path} was trained with {want} but this run sets {got}; "
            f"the student starts from {whose} weights: use {whose} values"
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
