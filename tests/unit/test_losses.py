"""CD / CT objectives and the EDM loss against closed forms on Gaussian data (no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmexp.diffusion import CMPrecond, euler_step, gaussian_consistency_fn, gaussian_denoiser, heun_step, karras_sigmas
from cmexp.losses import (
    ConsistencyDistillationLoss,
    ConsistencyTrainingLoss,
    EDMLoss,
    ICTWeighting,
    LognormalIndices,
    UniformIndices,
    UniformWeighting,
    l2,
)
from cmexp.nets import TinyUNet

SD = 0.5
EXACT = gaussian_consistency_fn(SD)


class Perturbed(nn.Module):
    """f(x, s) = f*(x, s) (1 + b s): consistent (exact) at b = 0."""

    def __init__(self, b: float) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return EXACT(x, sigma) * (1 + self.b * s)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return SD * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("solver", "n", "tol"), [(heun_step, 18, 1e-3), (heun_step, 200, 1e-6), (euler_step, 1000, 1e-5)])
def test_cd_with_exact_teacher_and_exact_model_has_zero_loss_and_gradient(solver, n, tol) -> None:
    torch.manual_seed(0)
    loss_fn = ConsistencyDistillationLoss(l2, solver, teacher=gaussian_denoiser(SD))
    sigmas = karras_sigmas(n, dtype=torch.float64)
    x = _images(512)
    exact, wrong = Perturbed(0.0), Perturbed(0.05)
    out = loss_fn(exact, exact, x, sigmas).loss
    ref = loss_fn(wrong, wrong, x, sigmas).loss
    assert out.shape == (512,)
    assert out.mean() < tol * ref.mean()
    out.mean().backward()
    ref.mean().backward()
    assert abs(exact.b.grad.item()) < 1e-3 * abs(wrong.b.grad.item())


def test_ct_and_cd_gradients_agree_for_small_steps_theorem_2() -> None:
    """Thm. 2: with Euler and the exact score, CT and CD have the same gradient up to o(dt)."""
    sigmas = torch.tensor([1.0, 0.99], dtype=torch.float64)
    first = lambda s, b, d: torch.zeros(b, dtype=torch.long, device=d)  # noqa: E731
    cd = ConsistencyDistillationLoss(l2, euler_step, teacher=gaussian_denoiser(SD), index_sampler=first)
    ct = ConsistencyTrainingLoss(l2, index_sampler=first)
    grads = {}
    for name, fn in (("cd", cd), ("ct", ct)):
        model = Perturbed(0.3)
        torch.manual_seed(1)  # same x_t and z for both
        fn(model, model, _images(200_000, seed=2), sigmas).loss.mean().backward()
        grads[name] = model.b.grad.item()
    assert grads["cd"] != 0
    assert grads["ct"] == pytest.approx(grads["cd"], rel=0.05)


def test_ct_uses_the_same_noise_at_both_levels() -> None:
    class Record(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x, sigma, class_labels=None):
            self.calls.append((x.clone(), torch.as_tensor(sigma).clone()))
            return x

    model = Record()
    x = _images(8)
    ConsistencyTrainingLoss(l2)(model, model, x, karras_sigmas(10, dtype=torch.float64))
    (x_t, s), (x_hat, s_next) = model.calls
    z1 = (x_t - x) / s.view(-1, 1, 1, 1)
    z2 = (x_hat - x) / s_next.view(-1, 1, 1, 1)
    torch.testing.assert_close(z1, z2)
    assert bool((s > s_next).all())


def test_online_and_target_see_the_same_dropout_mask() -> None:
    class DropoutFn(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, sigma, class_labels=None):
            return self.drop(torch.ones_like(x))

    model = DropoutFn().train()
    out = ConsistencyTrainingLoss(l2)(model, model, _images(16).float(), karras_sigmas(10))
    assert torch.equal(out.loss, torch.zeros(16))


def test_edm_loss_of_the_exact_denoiser_is_one_on_average() -> None:
    torch.manual_seed(0)
    loss = EDMLoss()(gaussian_denoiser(SD), _images(20_000))
    assert loss.shape == (20_000,)
    # per-dim error variance sd^2 s^2/(sd^2+s^2) times weight (s^2+sd^2)/(s sd)^2 = 1
    assert loss.mean().item() == pytest.approx(1.0, rel=0.03)


def test_weightings_and_index_samplers() -> None:
    s, s_next = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.5])
    assert torch.equal(UniformWeighting()(s, s_next), torch.ones(2))
    torch.testing.assert_close(ICTWeighting()(s, s_next), torch.tensor([2.0, 2.0]))
    sigmas = karras_sigmas(18)
    for sampler in (UniformIndices(), LognormalIndices()):
        idx = sampler(sigmas, 5000, torch.device("cpu"))
        assert idx.min() >= 0 and idx.max() <= 16
    ln = LognormalIndices()(karras_sigmas(200), 20000, torch.device("cpu"))
    mid = karras_sigmas(200)[ln].log().median().item()
    assert mid == pytest.approx(-1.1, abs=0.3)  # iCT: lognormal around P_mean = -1.1


def test_cd_end_to_end_with_a_conditional_net_only_the_online_net_gets_gradients() -> None:
    torch.manual_seed(0)
    online = CMPrecond(TinyUNet(8, 1, label_dim=3))
    target = CMPrecond(TinyUNet(8, 1, label_dim=3))
    target.requires_grad_(False)
    teacher = gaussian_denoiser(SD)
    x = torch.randn(4, 1, 8, 8) * SD
    labels = torch.tensor([0, 1, 2, 3])  # 3 = null label
    out = ConsistencyDistillationLoss(l2, heun_step, teacher=teacher)(online, target, x, karras_sigmas(18), labels)
    out.loss.mean().backward()
    assert out.loss.shape == (4,)
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())
