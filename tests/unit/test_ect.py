"""ECT (easy consistency tuning): the t -> r mapping, the loss's pieces, closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from cmexp.diffusion.precond import (
    ECTPrecond,
    boundary_scalings,
    edm_scalings,
    gaussian_consistency_fn,
)
from cmexp.losses import L2Distance, PseudoHuberDistance
from cmexp.methods.ect.loss import ECTLoss


def test_t_to_r_matches_ect_mapping() -> None:
    loss = ECTLoss(q=2.0, k=8.0, b=1.0)
    t = torch.tensor([0.01, 0.1, 1.0, 5.0, 80.0], dtype=torch.float64)
    for stage in range(6):
        n = 1 + 8 / (1 + torch.exp(t))  # 1 + k sigmoid(-b t)
        want = (t * (1 - n / 2 ** (stage + 1))).clamp_min(0)
        torch.testing.assert_close(loss.t_to_r(t, stage), want)
    # stage 0: r = 0 (a pure denoising target) wherever n(t) >= 2, i.e. small t; r ~ t/2 at t = 80
    r0 = loss.t_to_r(t, 0)
    assert bool((r0[:3] == 0).all()) and float(r0[-1]) == pytest.approx(40.0, rel=1e-6)
    # the gap shrinks by q per stage once n/q^(s+1) < 1 (large t: n -> 1)
    gaps = [float(80.0 - loss.t_to_r(torch.tensor(80.0), s)) for s in range(2, 6)]
    for a, b in itertools.pairwise(gaps):
        assert b == pytest.approx(a / 2, rel=1e-6)
    # k = 0: ECT's "const" mapping r = t (1 - 1/q^(s+1))
    torch.testing.assert_close(ECTLoss(k=0.0).t_to_r(t, 2), t * (1 - 1 / 8))


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ValueError, match="model.loss.q must be > 1"):
        ECTLoss(q=1.0)
    with pytest.raises(ValueError, match="model.loss.P_std"):
        ECTLoss(P_std=0.0)


def test_t_is_lognormal() -> None:
    torch.manual_seed(0)
    t = ECTLoss(P_mean=-1.1, P_std=2.0).sample_t(200_000, torch.device("cpu"))
    assert float(t.log().mean()) == pytest.approx(-1.1, abs=0.02)
    assert float(t.log().std()) == pytest.approx(2.0, abs=0.02)


class Recorder:
    """A consistency function that records its inputs and returns a fixed map of them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, bool]] = []

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.calls.append((x.clone(), sigma.clone(), torch.is_grad_enabled()))
        return 0.5 * x


def test_same_noise_target_at_r_and_data_where_r_is_zero() -> None:
    torch.manual_seed(1)
    images = torch.randn(512, 1, 4, 4, dtype=torch.float64) * 0.5
    loss = ECTLoss(metric=L2Distance(), stage=1)
    f = Recorder()
    out = loss(f, images)
    (x_r, r_in, grad_r), (x_t, t_in, grad_t) = f.calls  # target pass first, without gradients
    assert not grad_r and grad_t
    t, r = out.sigma, out.sigma_next
    torch.testing.assert_close(t_in, t)
    assert bool((r >= 0).all()) and bool((r < t).all())
    assert 0 < float((r == 0).float().mean()) < 1  # stage 1 mixes both kinds of target
    z_t = (x_t - images) / t.view(-1, 1, 1, 1)
    keep = r > 0
    z_r = (x_r[keep] - images[keep]) / r[keep].view(-1, 1, 1, 1)
    torch.testing.assert_close(z_r, z_t[keep], rtol=1e-4, atol=1e-4)  # the same noise
    torch.testing.assert_close(r_in[keep], r[keep])
    target = torch.where(keep.view(-1, 1, 1, 1), 0.5 * x_r, images)
    want = ((0.5 * x_t - target) ** 2).flatten(1).mean(1) / (t - r)
    torch.testing.assert_close(out.loss, want)


def test_default_metric_is_l2_norm_over_the_gap() -> None:
    torch.manual_seed(2)
    images = torch.randn(64, 1, 4, 4) * 0.5

    def f(x: Tensor, s: Tensor, c: Tensor | None = None) -> Tensor:
        # not linear in sigma, so the loss depends on r itself (with f = 0.9 x, |f(x_t) - f(x_r)|
        # / (t - r) = 0.9 |z| for every r > 0 and a wrong r would go unnoticed)
        return x / (1 + s.view(-1, 1, 1, 1) ** 2).sqrt()

    out = ECTLoss(stage=1)(f, images)  # stage 1: r = 0 for small t, r > 0 above
    # the expectation from ECT's formulas, not from the loss's own sample_t / t_to_r: the same
    # draws in the same order (images, then t's standard normals, then the noise)
    torch.manual_seed(2)
    images2 = torch.randn(64, 1, 4, 4) * 0.5
    t = torch.exp(-1.1 + 2.0 * torch.randn(64))  # lognormal, P_mean -1.1, P_std 2.0
    n = 1 + 8 / (1 + torch.exp(t))  # n(t) = 1 + k sigmoid(-b t), k = 8, b = 1
    r = torch.clamp(t * (1 - n / 2.0 ** (1 + 1)), min=0.0)  # stage 1, q = 2
    z = torch.randn_like(images2)
    x_t = images2 + t.view(-1, 1, 1, 1) * z
    x_r = images2 + r.view(-1, 1, 1, 1) * z
    diff = f(x_t, t) - torch.where((r > 0).view(-1, 1, 1, 1), f(x_r, r), images2)
    assert 0 < float((r > 0).float().mean()) < 1  # both kinds of target
    torch.testing.assert_close(out.loss, diff.flatten(1).norm(dim=1) / (t - r))


def test_point_mass_exact_consistency_function_zero_loss_and_gradient() -> None:
    """Data = one point m: x + t z and x + r z lie on the same (straight) PF-ODE trajectory, so the
    exact consistency function f(x, t) = m + eps (x - m) / t gives zero loss and zero gradient."""
    eps, m = 0.002, 0.3
    a = nn.Parameter(torch.zeros(()))

    def f(x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        s = sigma.view(-1, 1, 1, 1)
        exact = m + eps * (x - m) / s
        return exact + a * exact**2  # a = 0: exact; the gradient wrt a must vanish with the loss

    torch.manual_seed(3)
    images = torch.full((256, 1, 2, 2), m)
    loss = ECTLoss(metric=PseudoHuberDistance(c=0.01), stage=4)  # stage 4: r > 0 for every t
    out = loss(f, images)
    assert bool((out.sigma_next > 0).all())
    assert float(out.loss.detach().abs().max()) < 1e-5
    out.loss.mean().backward()
    assert abs(float(a.grad)) < 1e-5


def test_gaussian_expected_gradient_vanishes_with_the_gap() -> None:
    """Gaussian data N(0, sd^2): at the exact consistency function the expected gradient of the
    weighted squared-l2 ECT loss is O(t - r) (the one-sample Euler target is exact to O(dt^2),
    weighted by 1/dt), so each stage (q = 2) halves it; a wrong pairing would not vanish."""
    sd, eps = 0.5, 0.002
    exact = gaussian_consistency_fn(sd, eps)
    grads = []
    for stage in (3, 4, 5):
        torch.manual_seed(4)
        a = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def f(
            x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, a: Tensor = a
        ) -> Tensor:
            return (1 + a) * exact(x, sigma)

        images = torch.randn(400_000, 1, 1, 1, dtype=torch.float64) * sd
        loss = ECTLoss(metric=L2Distance(), P_mean=-1.1, P_std=0.5, stage=stage)
        loss(f, images).loss.mean().backward()
        grads.append(float(a.grad))
    assert abs(grads[0]) > 1e-3
    assert grads[1] / grads[0] == pytest.approx(0.5, abs=0.08)
    assert grads[2] / grads[1] == pytest.approx(0.5, abs=0.1)


def test_ect_precond_edm_scalings_in_training_boundary_when_sampling() -> None:
    class Const(nn.Module):
        img_resolution, img_channels = 2, 1

        def forward(self, x: Tensor, noise: Tensor, labels: Tensor | None = None) -> Tensor:
            return torch.ones_like(x)

    m = ECTPrecond(Const(), sigma_min=0.003, sigma_max=80.0, sigma_data=0.5)
    x = torch.randn(3, 1, 2, 2)
    sigma = torch.tensor([0.001, 0.5, 10.0])
    m.train()
    c_skip, c_out, _ = edm_scalings(sigma, 0.5)
    torch.testing.assert_close(m(x, sigma), c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1))
    m.eval()
    c_skip, c_out, _ = boundary_scalings(sigma, 0.5, 0.003)
    torch.testing.assert_close(m(x, sigma), c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1))
    torch.testing.assert_close(m(x, 0.003), x)  # f(x, eps) = x when sampling
    assert math.isclose(m.sigma_min, 0.003)
