"""Sampling, ``cmexp.eval`` and checkpoints across devices: samples and metrics on CUDA equal
the CPU's, and a checkpoint written on one device resumes on the other and continues the run
as an uninterrupted run on that device does. Tolerances: tests/gpu/helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu import helpers as H

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> dict[str, Path]:
    """Checkpoints written on the CPU: a consistency model (CT), an sCT model (TrigFlow) and
    a diffusion model (the EDM teacher)."""
    base = tmp_path_factory.mktemp("ckpts")
    out = {"edm": teacher}
    for method in ("ct", "sct"):
        cfg = H.compose(method, base / method, *H.accelerator("cpu"))
        H.run(cfg, steps=2, same_noise=False)
        out[method] = base / method / "checkpoints" / "last.ckpt"
    return out


def _plans() -> list[tuple[str, str]]:
    return [("ct", "1step"), ("ct", "2step"), ("sct", "1step"), ("sct", "2step")] + [
        ("edm", s) for s in H.registry.samplers("denoiser")
    ]


@pytest.mark.parametrize(("kind", "plan"), _plans())
def test_sampling_on_cuda_agrees_with_the_cpu(ckpts, kind: str, plan: str) -> None:
    """One-step and multistep consistency sampling, and each diffusion sampler (4 solver
    steps), from the same seeds (noise drawn per image by CPU generators on every device)."""
    name, sigmas, sampler = next(p for p in H.sampling_plans(ckpts[kind]) if p[0] == plan)
    cpu = H.sample(ckpts[kind], "cpu", sigmas, sampler)
    cuda = H.sample(ckpts[kind], H.DEVICE, sigmas, sampler)
    assert cpu.shape == cuda.shape == (4, 3, 32, 32) and cpu.std() > 0
    torch.testing.assert_close(cuda, cpu, atol=H.SAMPLE_ATOL, rtol=0)


def test_eval_on_cuda_gives_the_cpu_numbers(ckpts, tmp_path: Path) -> None:
    clf = H.classifier_checkpoint(tmp_path / "clf")
    results = {
        device: H.eval_metrics(ckpts["ct"], clf, tmp_path / f"eval_{device}", device)
        for device in ("cpu", H.DEVICE)
    }
    cpu, cuda = results["cpu"], results[H.DEVICE]
    assert set(cpu) == set(cuda) == {"1step", "2step"}
    for name, metrics in cpu.items():
        assert metrics, name
        assert cuda[name] == pytest.approx(metrics, rel=H.EVAL_RTOL, abs=H.EVAL_ATOL), name


#: a fixed N (the adaptive curriculum is pinned to trainer.max_steps, which differs between
#: the 2-step head run and the 4-step runs)
FIXED = ("schedule=fixed",)


def _resume_in_a_cpu_process(ckpt: Path, out: Path) -> H.StepRecorder:
    """Continue ``ckpt`` to step 4 with ``python -m cmexp.train`` in a process that sees no
    CUDA device (CUDA_VISIBLE_DEVICES=''), as on a machine without a GPU."""
    record = out / "record"
    cmd = [
        sys.executable,
        "-m",
        "cmexp.train",
        f"+experiment={H.METHODS['ct']}",
        *H.TINY,
        *H.accelerator("cpu"),
        *FIXED,
        "trainer.max_steps=4",
        f"ckpt_path={ckpt}",
        f"paths.root_dir={out}",
        f"hydra.run.dir={out / 'run'}",
        "+callbacks.record._target_=tests.gpu.helpers.StepRecorder",
        f"+callbacks.record.path={record}",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        cmd, cwd=H.ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = H.StepRecorder()
    rec.__dict__.update(torch.load(f"{record}.rank0.pt", weights_only=False))
    return rec


@pytest.mark.parametrize("direction", ["cuda_to_cpu", "cpu_to_cuda"])
def test_checkpoint_resumes_on_the_other_device(tmp_path: Path, direction: str) -> None:
    """CT (RAdam), 2 steps on one device, then steps 3-4 on the other from its last.ckpt
    (CUDA -> CPU in a process without CUDA): the resumed run starts from the checkpoint's
    weights and its steps 3-4 match an uninterrupted 4-step run on the second device."""
    first, second = (H.DEVICE, "cpu") if direction == "cuda_to_cpu" else ("cpu", H.DEVICE)
    head = H.train_step("ct", tmp_path / "head", first, *FIXED, steps=2)
    ckpt = tmp_path / "head" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    if second == "cpu":
        tail = _resume_in_a_cpu_process(ckpt, tmp_path / "tail")
    else:
        tail = H.train_step("ct", tmp_path / "tail", second, *FIXED, f"ckpt_path={ckpt}", steps=4)
    ref = H.train_step("ct", tmp_path / "ref", second, *FIXED, steps=4)
    assert tail.device.startswith(second)
    assert H.rel_err(tail.start, head.end) == 0.0  # resumed from the checkpoint's weights
    assert len(tail.losses) == 2 and len(ref.losses) == 4
    for a, b in zip(tail.losses, ref.losses[2:], strict=True):
        assert H.rel(a, b) <= H.FP32_GRAD_RTOL, (tail.losses, ref.losses)
    moved = {k: tail.end[k] - ref.start[k] for k in ref.start}
    ref_moved = {k: ref.end[k] - ref.start[k] for k in ref.start}
    assert H.rel_err(moved, ref_moved) <= 10 * H.FP32_GRAD_RTOL
