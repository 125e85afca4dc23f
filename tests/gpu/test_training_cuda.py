"""One training step of every method on CUDA against the same step on the CPU (fp32), in
bf16-mixed, compiled and channels_last, and sCM's JVP tangent against its finite difference.

Every run is ``+experiment=fmnist_<method> debug=tiny`` (tiny UNet, synthetic 3x32x32 batch of
8, no dropout) through :func:`cmexp.train.train` with the same seed, batch and noise
(:func:`tests.gpu.helpers.cpu_draws`); a step is compared by its loss and its gradients (every
trained parameter, before the optimizer update). Tolerances: tests/gpu/helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.gpu import helpers as H

pytestmark = pytest.mark.gpu

#: sCT/sCD: no tangent warm-up, so the step's loss uses the JVP term (r = 1 from step 0; with
#: r = 0 a fresh sCD student equals its teacher and its loss is exactly 0)
EXTRA = {m: ("model.loss.warmup_steps=0",) for m in ("sct", "scd")}


@pytest.fixture(scope="module")
def step(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Callable[..., H.StepRecorder]:
    """``step(method, device, *overrides, precision=...)``: one recorded training step, cached
    for the module (the CPU and CUDA fp32 steps serve several comparisons)."""
    cache: dict[tuple, H.StepRecorder] = {}
    base = tmp_path_factory.mktemp("steps")

    def get(
        method: str, device: str, *overrides: str, precision: str = "32-true"
    ) -> H.StepRecorder:
        key = (method, device, precision, overrides)
        if key not in cache:
            out = base / f"{method}_{device}_{precision}_{len(cache)}"
            over = (*EXTRA.get(method, ()), *overrides)
            cache[key] = H.train_step(
                method, out, device, *over, precision=precision, teacher=teacher
            )
        return cache[key]

    return get


def _check_step(
    rec: H.StepRecorder, ref: H.StepRecorder, loss_rtol: float, grad_rtol: float
) -> None:
    assert len(rec.losses) == len(ref.losses) == 1 and len(rec.grads) == 1
    assert rec.grads[0], "no gradients recorded"
    assert H.rel(rec.losses[0], ref.losses[0]) <= loss_rtol, (rec.losses, ref.losses)
    err = H.rel_err(rec.grads[0], ref.grads[0])
    assert err <= grad_rtol, f"gradient differs by {err:.2e} (relative norm)"
    assert H.all_finite(rec.end)


@pytest.mark.parametrize("method", list(H.METHODS))
def test_fp32_step_on_cuda_agrees_with_the_cpu_step(step, method: str) -> None:
    cpu, cuda = step(method, "cpu"), step(method, H.DEVICE)
    assert cuda.device.startswith(H.DEVICE) and cpu.device == "cpu"
    assert cuda.param_dtype == "torch.float32"
    assert H.rel_err(cuda.start, cpu.start) == 0.0  # same initial weights (seed / teacher)
    _check_step(cuda, cpu, H.FP32_LOSS_RTOL, H.FP32_GRAD_RTOL)


@pytest.mark.parametrize("method", list(H.METHODS))
def test_bf16_mixed_step_is_finite_and_near_fp32(step, method: str) -> None:
    """bf16-mixed (Lightning's autocast) against fp32 on the same device. On the CPU, sCT/sCD
    fail here inside torch.func.jvp (autocast with forward-mode AD: "Input type ... and weight
    type ... should be the same"); this test shows whether CUDA does too."""
    fp32 = step(method, H.DEVICE)
    bf16 = step(method, H.DEVICE, precision="bf16-mixed")
    loss = bf16.losses[0]
    assert torch.isfinite(torch.tensor(loss)) and H.all_finite(bf16.grads[0])
    assert H.rel(loss, fp32.losses[0]) <= H.BF16_LOSS_RTOL, (loss, fp32.losses[0])


@pytest.mark.parametrize("method", ["ct", "sct"])
def test_compiled_step_agrees_with_eager(step, method: str) -> None:
    """``model.compile_net=true`` (torch.compile of the online network; sCT: under the JVP)."""
    eager = step(method, H.DEVICE)
    compiled = step(method, H.DEVICE, "model.compile_net=true")
    _check_step(compiled, eager, H.COMPILE_LOSS_RTOL, H.COMPILE_GRAD_RTOL)


@pytest.mark.parametrize("method", ["ct", "cd", "sct"])
def test_channels_last_step_agrees_with_eager(step, method: str) -> None:
    eager = step(method, H.DEVICE)
    nhwc = step(method, H.DEVICE, "model.channels_last=true")
    _check_step(nhwc, eager, H.COMPILE_LOSS_RTOL, H.COMPILE_GRAD_RTOL)


def test_jvp_tangent_on_cuda_agrees_with_the_finite_difference(tmp_path: Path) -> None:
    """sCM's tangent ``cos t sin t dF/dt`` by ``tangent=jvp`` (torch.func.jvp) on CUDA against
    ``tangent=finite_difference`` (central difference, eps 1e-3, fp32: error ~ 1e-7 / eps
    relative, measured 1e-3 on the CPU; tolerance 1e-2), and against the JVP on the CPU
    (fp32 rounding only: 1e-4)."""
    jvp_cuda, fd_cuda = H.tangents(tmp_path, H.DEVICE)
    jvp_cpu, _ = H.tangents(tmp_path, "cpu")
    assert torch.isfinite(jvp_cuda).all() and jvp_cuda.abs().max() > 0
    err = float((jvp_cuda - fd_cuda).norm() / jvp_cuda.norm())
    assert err <= H.TANGENT_FD_RTOL, f"JVP and finite difference differ by {err:.2e}"
    err = float((jvp_cuda - jvp_cpu).norm() / jvp_cpu.norm())
    assert err <= H.FP32_LOSS_RTOL, f"JVP on CUDA and on the CPU differ by {err:.2e}"
