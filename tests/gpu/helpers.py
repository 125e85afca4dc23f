"""Plumbing of the CUDA test set, and its only imports of ``cmexp`` (entry points and the
inference API), kept in one place so a refactor of the package updates one file.

Models are built from the Hydra tree (``+experiment=fmnist_<method> debug=tiny``), trained by
:func:`cmexp.train.train`, and observed through :class:`StepRecorder`, a callback added by
config (``callbacks.record``), so nothing here names a LightningModule class.

Same seed, same batch, same noise: the losses draw their noise on the batch's device, and a
CUDA generator draws other numbers than the CPU one for the same seed. :func:`cpu_draws`
therefore routes ``torch.randn/rand/randint/*_like/multinomial`` to the CPU generator (float32,
then cast and moved) while a comparison runs, so a CPU run and a CUDA run of one step see the
same images, noise levels and noise. Dropout draws on the device: the tests use none.

``CMEXP_GPU_TESTS_ON_CPU=1`` runs the set with "cuda" replaced by the CPU (every comparison is
then CPU against CPU): it checks the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cmexp.eval import evaluate
from cmexp import registry
from cmexp.inference import (  # noqa: F401
    generate,
    load_model,
    sigma_plan,
    solver_plan,
)
from cmexp.train import train
from tests.integration.conftest import CONF_DIR, compose_train

ROOT = CONF_DIR.parent
ON_CPU = os.environ.get("CMEXP_GPU_TESTS_ON_CPU") == "1"
#: the device under test ("cuda", or "cpu" with CMEXP_GPU_TESTS_ON_CPU=1)
DEVICE = "cpu" if ON_CPU else "cuda"

# ------------------------------------------------------------------ tolerances
# fp32 on CUDA (TF32 off, as cmexp.train sets it) and on the CPU differ only in the order of
# floating-point sums (cuDNN/cuBLAS vs oneDNN/MKL kernels): about 1e-7 relative per reduction.
# Calibrated on the CPU against the same step in float64 (precision=64-true, the same noise):
# the fp32 step's loss is within 1e-6 and its gradient within 1e-5 (relative norm) of the
# float64 step for every method, so two fp32 steps differ by at most about twice that; the
# tolerances leave a factor of 50-100 on top.
FP32_LOSS_RTOL = 1e-4
FP32_GRAD_RTOL = 1e-3  # ||g_cuda - g_cpu|| / ||g_cpu|| over all trained parameters
# bf16-mixed: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) in the autocast
# matmuls and convolutions; the loss is a mean over the batch of sums over pixels, where those
# errors mostly average out. Measured on the CPU (bf16-mixed against fp32): 1-5% for the tiny
# networks; 10% is the stated tolerance.
BF16_LOSS_RTOL = 0.10
# torch.compile (Inductor) fuses and reorders the same fp32 arithmetic; channels_last changes
# the convolution kernels: same order of rounding as CPU vs CUDA.
COMPILE_LOSS_RTOL = 1e-4
COMPILE_GRAD_RTOL = 1e-3
# sCM tangent: fp32 central difference with eps = 1e-3 against the JVP (rounding error about
# 1e-7 / eps plus an O(eps^2) truncation; measured 1e-3 relative on the CPU)
TANGENT_FD_RTOL = 1e-2
# samples in [-1, 1] after 1-35 network evaluations: fp32 kernel differences stay below 1e-4;
# 1e-3 is an eighth of a uint8 level.
SAMPLE_ATOL = 1e-3
# metrics of cmexp.eval (Frechet distance, KID, IS ...) from those samples
EVAL_RTOL, EVAL_ATOL = 1e-2, 1e-4

#: one ``+experiment`` per training method, shrunk by ``debug=tiny`` (tiny UNet, synthetic
#: 3x32x32 data) with no dropout (dropout masks come from the device's own generator)
METHODS: dict[str, str] = {
    "edm": "fmnist_edm",
    "cd": "fmnist_cd_l2",
    "ct": "fmnist_ct_adaptive",
    "ict": "fmnist_ct_pseudo_huber",
    "ect": "fmnist_ect",
    "sct": "fmnist_sct",
    "scd": "fmnist_scd",
    "pd": "fmnist_pd",
    "tcm": "fmnist_tcm",
    "imm": "fmnist_imm",
    "meanflow": "fmnist_meanflow",
}
#: methods that distil or tune an EDM teacher (``model.teacher_path``)
NEEDS_TEACHER = ("cd", "ect", "scd", "pd")
#: methods that start from a stage-1 consistency model (``model.stage1_path``: a tiny ECT run
#: from the teacher, :func:`stage1_checkpoint`)
NEEDS_STAGE1 = ("tcm",)
#: a method's own overrides under debug=tiny (IMM: the tiny net takes the second time s)
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    m: ("net.guidance_embed=true",) for m in ("imm", "meanflow")
}
TINY = [
    "debug=tiny",
    "quality=none",
    "net.dropout=0.0",
    "model.lr_warmup_kimg=0",  # EDM's warm-up would make the first step a zero step
    "dataset.batch_size=8",
]


# ------------------------------------------------------------------ same noise on every device
_DRAWS = ("randn", "rand", "randint")
_LIKE = {"randn_like": "randn", "rand_like": "rand"}


def _on_cpu(fn: Callable[..., torch.Tensor], real: bool) -> Callable[..., torch.Tensor]:
    """``fn`` drawing on the CPU (real-valued draws in float32), then cast and moved."""

    def draw(*args: Any, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None or kw.get("out") is not None:
            return fn(*args, **kw)
        device = kw.pop("device", None)
        dtype = kw.pop("dtype", None)
        grad = kw.pop("requires_grad", False)
        floating = real and (dtype is None or dtype.is_floating_point)
        x = fn(*args, dtype=torch.float32, **kw) if floating else fn(*args, **kw)
        x = x.to(device=device, dtype=dtype or x.dtype)
        return x.requires_grad_(grad) if grad else x

    return draw


@contextlib.contextmanager
def cpu_draws() -> Iterator[None]:
    """Draw every ``torch.randn/rand/randint``, ``randn_like/rand_like`` and ``multinomial``
    from the CPU generator in float32, then cast and move it (see the module docstring)."""
    saved = {name: getattr(torch, name) for name in (*_DRAWS, *_LIKE, "multinomial")}
    patched = {name: _on_cpu(saved[name], name != "randint") for name in _DRAWS}

    def like(base: str) -> Callable[..., torch.Tensor]:
        def draw(x: torch.Tensor, dtype: torch.dtype | None = None, **kw: Any) -> torch.Tensor:
            kw.pop("memory_format", None)
            device = kw.pop("device", None) or x.device
            return patched[base](tuple(x.shape), dtype=dtype or x.dtype, device=device, **kw)

        return draw

    def multinomial(probs: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None:
            return saved["multinomial"](probs, *args, **kw)
        return saved["multinomial"](probs.detach().float().cpu(), *args, **kw).to(probs.device)

    try:
        for name, fn in patched.items():
            setattr(torch, name, fn)
        for name, base in _LIKE.items():
            setattr(torch, name, like(base))
        torch.multinomial = multinomial
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


# ------------------------------------------------------------------ observing a training run
def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


class StepRecorder(pl.Callback):
    """Records the trained parameters at the start and the end of a run and, per optimizer
    step, the loss and the gradients (after AMP unscaling, before the update). With ``path``,
    each rank also saves them to ``<path>.rank<k>.pt`` (runs in another process)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.backend: str | None = None
        self.world_size = 1
        self.device = ""
        self.param_dtype = ""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = _params(pl_module)
        self.device = str(pl_module.device)
        self.param_dtype = str(next(pl_module.parameters()).dtype)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self.backend, self.world_size = str(dist.get_backend()), dist.get_world_size()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.grads.append(
            {
                n: p.grad.detach().float().cpu().clone()
                for n, p in pl_module.named_parameters()
                if p.grad is not None
            }
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = _params(pl_module)
        if self.path:
            torch.save(self.report(), f"{self.path}.rank{trainer.global_rank}.pt")

    def report(self) -> dict[str, Any]:
        keys = ("losses", "grads", "start", "end", "backend", "world_size", "device")
        return {k: getattr(self, k) for k in (*keys, "param_dtype")}


def compose(method: str, out: Path, *overrides: str, teacher: Path | None = None) -> DictConfig:
    """The ``debug=tiny`` config of ``method`` (a key of :data:`METHODS`), outputs in ``out``."""
    over = [f"+experiment={METHODS[method]}", *TINY, *METHOD_OVERRIDES.get(method, ())]
    if method in NEEDS_TEACHER or method in NEEDS_STAGE1:
        if teacher is None:
            raise ValueError(f"{method} needs a teacher checkpoint")
        over.append(f"model.teacher_path={teacher}")
    if method in NEEDS_STAGE1:
        over = [o for o in over if not o.startswith("model.teacher_path=")]
        over.append(f"model.stage1_path={stage1_checkpoint(teacher)}")
    return compose_train([*over, *overrides], out)


def stage1_checkpoint(teacher: Path) -> Path:
    """A stage-1 consistency model for TCM: ``+experiment=fmnist_ect debug=tiny`` from
    ``teacher``, 2 CPU steps, made once beside the teacher's run folder."""
    folder = teacher.parents[2] / "tcm_stage1"
    ckpt = folder / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        cfg = compose("ect", folder, *accelerator("cpu"), teacher=teacher)
        run(cfg, steps=2, same_noise=False)
    return ckpt


def accelerator(device: str, precision: str = "32-true") -> list[str]:
    """Overrides that run on ``device`` ("cpu" or "cuda") in ``precision``."""
    acc = "gpu" if device.startswith("cuda") else "cpu"
    return [f"trainer.accelerator={acc}", "trainer.devices=1", f"trainer.precision={precision}"]


def run(cfg: DictConfig, steps: int = 1, same_noise: bool = True) -> tuple[StepRecorder, dict]:
    """Train ``cfg`` for ``steps`` optimizer steps with a :class:`StepRecorder`; returns it and
    :func:`cmexp.train.train`'s result."""
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        cfg.callbacks.record = {"_target_": "tests.gpu.helpers.StepRecorder"}
    with cpu_draws() if same_noise else contextlib.nullcontext():
        out = train(cfg)
    rec = next(c for c in out["trainer"].callbacks if isinstance(c, StepRecorder))
    return rec, out


def train_step(
    method: str,
    out: Path,
    device: str,
    *overrides: str,
    precision: str = "32-true",
    teacher: Path | None = None,
    steps: int = 1,
) -> StepRecorder:
    """``steps`` training steps of ``method`` on ``device`` (same seed, batch and noise)."""
    cfg = compose(method, out, *accelerator(device, precision), *overrides, teacher=teacher)
    return run(cfg, steps)[0]


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all entries (the same keys in both)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / max(den, 1e-300)) ** 0.5


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def teacher_checkpoint(folder: Path) -> Path:
    """An EDM teacher for CD/ECT/sCD/PD: ``+experiment=fmnist_edm debug=tiny``, 2 CPU steps."""
    cfg = compose("edm", folder, *accelerator("cpu"), "callbacks.checkpoint.every_n_train_steps=2")
    run(cfg, steps=2, same_noise=False)
    return folder / "checkpoints" / "last.ckpt"


def config_value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def sampling_plans(ckpt: Path) -> list[tuple[str, Sequence[float], str]]:
    """``(name, sigmas, sampler)`` of every way a checkpoint samples: a consistency model
    1 and 2 steps (Alg. 1); a diffusion model each sampler of cmexp.inference on 4 solver
    steps."""
    loaded = load_model(ckpt)
    if not loaded.spec.uses_solver:
        return [(f"{k}step", sigma_plan(loaded.spec, k), loaded.spec.sampler) for k in (1, 2)]
    return [(s, solver_plan(loaded.spec, 4), s) for s in registry.samplers(loaded.family)]


def sample(ckpt: Path, device: str, sigmas: Sequence[float], sampler: str) -> torch.Tensor:
    """Four seeded samples of ``ckpt`` on ``device`` (images in [-1, 1], on the CPU)."""
    loaded = load_model(ckpt)
    return generate(loaded, 4, sigmas, seed=3, batch_size=4, sampler=sampler, device=device)


def tangents(folder: Path, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sCM's tangent ``cos t sin t dF/dt`` of a fresh ``fmnist_sct`` network (tiny UNet, eval
    mode) on ``device``, by ``tangent=jvp`` and by ``tangent=finite_difference``, at fixed
    CPU-drawn ``x_t``, ``t`` and ``dx_t/dt``; both returned on the CPU."""
    import hydra

    cfg = compose("sct", folder / "tangent", *accelerator("cpu"))
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model).model.to(device).eval()
    jvp = hydra.utils.instantiate(cfg.tangent)
    fd = hydra.utils.instantiate(OmegaConf.load(CONF_DIR / "tangent" / "finite_difference.yaml"))
    gen = torch.Generator().manual_seed(1)
    shape = (4, model.img_channels, model.img_resolution, model.img_resolution)
    x_t = (0.5 * torch.randn(shape, generator=gen)).to(device)
    dxdt = (0.5 * torch.randn(shape, generator=gen)).to(device)
    t = torch.tensor([0.2, 0.7, 1.1, 1.4]).to(device)

    def fn(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return model.F(x, tt, None)

    with torch.no_grad():
        return jvp(fn, x_t, t, dxdt).cpu(), fd(fn, x_t, t, dxdt).cpu()


def classifier_checkpoint(folder: Path) -> Path:
    """A tiny feature classifier (2 CPU steps) for ``cmexp.eval``'s domain metrics."""
    cfg = compose_train(
        [
            "debug=tiny",
            "model=classifier",
            "net=small_cnn",
            "net.width=4",
            "net.feature_dim=8",
            "~callbacks.sample_grid",
            *accelerator("cpu"),
            "trainer.max_steps=2",
        ],
        folder,
    )
    train(cfg)
    return folder / "checkpoints" / "last.ckpt"


def eval_metrics(ckpt: Path, clf: Path, out: Path, device: str) -> dict[str, dict[str, float]]:
    """``cmexp.eval`` of ``ckpt`` on ``device`` (1 and 2 steps, 32 samples, 64 real images,
    its own real-feature cache): the metrics per sample set."""
    cfg = compose_train(
        [
            f"ckpt={ckpt}",
            "steps=[1,2]",
            "num_samples=32",
            "num_real=64",
            "batch_size=16",
            f"device={device}",
            f"features.ckpt={clf}",
            f"cache_dir={out / 'cache'}",
        ],
        out / "run",
        config_name="eval",
    )
    return evaluate(cfg)["metrics"]
