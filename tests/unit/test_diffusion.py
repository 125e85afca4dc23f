"""The engine against closed forms: sigma grid, N(k)/mu(k), scalings, boundary condition,
PF-ODE solvers and samplers on Gaussian data and a Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cmexp.diffusion import (
    AdaptiveSchedule,
    CMPrecond,
    EDMPrecond,
    FixedSchedule,
    ImprovedSchedule,
    SeededNoise,
    adaptive_schedule,
    append_zero,
    boundary_scalings,
    edm_scalings,
    ema_update_,
    euler_step,
    gaussian_consistency_fn,
    gaussian_denoiser,
    gaussian_mixture_denoiser,
    heun_step,
    karras_sigmas,
    sample_euler,
    sample_heun,
    sample_multistep,
    sample_onestep,
)
from cmexp.nets import TinyUNet

SD = 0.5


# ------------------------------------------------------------------ sigma grid
def test_karras_grid_endpoints_monotone_and_reference_values() -> None:
    s = karras_sigmas(18, dtype=torch.float64)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002
    assert karras_sigmas(18).dtype == torch.float32
    assert bool((s[1:] < s[:-1]).all())
    ref = [80, 57.59, 40.79, 28.37, 19.35, 12.91, 8.401, 5.315, 3.257, 1.923, 1.088, 0.5853,
           0.2964, 0.1395, 0.0599, 0.0229, 0.0075, 0.002]  # reference.md 1.1
    for got, want in zip(s.tolist(), ref):
        assert got == pytest.approx(want, rel=5e-3)  # printed to 2-4 significant digits
    assert s[11].item() == pytest.approx(0.585, abs=1e-3)  # the CIFAR-10 CD 2-step tau


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(num_scales=1), "num_scales"), (dict(num_scales=18, sigma_min=0.0), "sigma_min"),
    (dict(num_scales=18, sigma_min=80.0), "sigma_min must be < sigma_max"), (dict(num_scales=18, rho=0), "rho"),
])
def test_karras_grid_bad_arguments_name_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        karras_sigmas(**kwargs)


# ------------------------------------------------------------------ N(k), mu(k)
TABLE = [  # reference.md 1.5: k, N, mu (code), mu (paper); s0 2, s1 150, mu0 0.9, K 800k
    (0, 2, 0.810, 0.900), (1_000, 6, 0.9587, 0.9655), (10_000, 17, 0.98692, 0.98768),
    (100_000, 54, 0.99603, 0.99611), (200_000, 76, 0.99719, 0.99723), (400_000, 107, 0.99801, 0.99803),
    (740_000, 146, 0.99855, 0.99856), (800_000, 151, 0.99860, 0.99861),
]


@pytest.mark.parametrize(("k", "n", "mu_code", "mu_paper"), TABLE)
def test_adaptive_schedule_reproduces_the_reference_table(k, n, mu_code, mu_paper) -> None:
    assert adaptive_schedule(k, 800_000, 2, 150, 0.9, "code") == (n, pytest.approx(mu_code, abs=6e-5))
    assert adaptive_schedule(k, 800_000, 2, 150, 0.9, "paper") == (n, pytest.approx(mu_paper, abs=6e-5))
    assert AdaptiveSchedule(800_000)(k) == adaptive_schedule(k, 800_000)


def test_schedule_objects() -> None:
    assert FixedSchedule(18, 0.0)(12345) == (18, 0.0)
    with pytest.raises(ValueError, match="num_scales"):
        FixedSchedule(1, 0.0)
    with pytest.raises(ValueError, match="mu"):
        FixedSchedule(18, 1.0)
    with pytest.raises(ValueError, match="s1"):
        AdaptiveSchedule(100, s0=10, s1=5)
    with pytest.raises(ValueError, match="variant"):
        adaptive_schedule(0, 10, variant="other")
    ict = ImprovedSchedule(total_steps=800)
    ns = [ict(k)[0] for k in range(0, 800, 100)]
    assert ns[0] == 11 and ns == sorted(ns) and max(ns) <= 1281 and ict(10**6) == (1281, 0.0)


# ------------------------------------------------------------------ scalings, boundary
def test_scalings_match_the_formulas() -> None:
    t = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = boundary_scalings(t)
    eps = 0.002
    torch.testing.assert_close(c_skip, SD**2 / ((t - eps) ** 2 + SD**2))
    torch.testing.assert_close(c_out, SD * (t - eps) / torch.sqrt(SD**2 + t**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(t**2 + SD**2))
    assert c_skip[0] == 1 and c_out[0] == 0
    e_skip, e_out, e_in = edm_scalings(t)
    torch.testing.assert_close(e_skip, SD**2 / (t**2 + SD**2))
    torch.testing.assert_close(e_out, t * SD / torch.sqrt(t**2 + SD**2))
    torch.testing.assert_close(e_in, 1 / torch.sqrt(t**2 + SD**2))


class _Wild(nn.Module):
    img_resolution, img_channels, label_dim = 8, 3, 0

    def forward(self, x, noise_labels, class_labels=None):
        return 1e3 * torch.sin(x * 7) + noise_labels[:, None, None, None]


@pytest.mark.parametrize("net", [TinyUNet(8, 3), _Wild()])
def test_boundary_condition_is_exact_for_any_network(net) -> None:
    torch.manual_seed(0)
    f = CMPrecond(net)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(f(x, 0.002), x)
    assert not torch.allclose(f(x, 1.0), x)


def test_c_noise_options() -> None:
    seen = []

    class Spy(_Wild):
        def forward(self, x, noise_labels, class_labels=None):
            seen.append(noise_labels)
            return x

    sigma = torch.tensor([0.5, 2.0])
    EDMPrecond(Spy())(torch.zeros(2, 3, 8, 8), sigma)
    EDMPrecond(Spy(), c_noise_scale=250.0)(torch.zeros(2, 3, 8, 8), sigma)
    torch.testing.assert_close(seen[0], sigma.log() / 4)
    torch.testing.assert_close(seen[1], 1000 * sigma.log() / 4)


# ------------------------------------------------------------------ solvers vs the exact PF-ODE
def _exact(x0, s0, s1):
    return x0 * math.sqrt((SD**2 + s1**2) / (SD**2 + s0**2))


@pytest.mark.parametrize(("step", "order"), [(euler_step, 2), (heun_step, 3)])
def test_local_error_order(step, order) -> None:
    D = gaussian_denoiser(SD)
    x0 = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    s = 1.0
    errs = []
    for h in (0.1, 0.05, 0.025):
        x1 = step(D, x0, torch.tensor(s, dtype=torch.float64), torch.tensor(s - h, dtype=torch.float64))
        errs.append((x1 - _exact(x0, s, s - h)).abs().max().item())
    for a, b in zip(errs, errs[1:]):
        assert a / b == pytest.approx(2**order, rel=0.2)


def test_full_samplers_converge_and_heun_uses_2n_minus_1_nfe() -> None:
    calls = []
    D0 = gaussian_denoiser(SD)

    def D(x, s, c=None):
        calls.append(1)
        return D0(x, s, c)

    x0 = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    exact = _exact(80 * x0, 80.0, 0.002)
    errs = {}
    for n in (18, 72):
        sig = karras_sigmas(n, dtype=torch.float64)
        calls.clear()
        out = sample_heun(D, 80 * x0, sig)
        assert len(calls) == 2 * (n - 1)  # 2 NFE per step between positive sigmas (no step to 0)
        errs[("heun", n)] = (out - exact).abs().max().item()
        errs[("euler", n)] = (sample_euler(D0, 80 * x0, sig) - exact).abs().max().item()
    assert errs[("heun", 72)] < errs[("heun", 18)] / 10
    assert errs[("euler", 72)] < errs[("euler", 18)] / 3
    assert errs[("heun", 72)] < 1e-2
    calls.clear()
    sample_heun(D, 80 * x0, append_zero(karras_sigmas(18, dtype=torch.float64)))
    assert len(calls) == 35  # CM paper Table 1: EDM at 35 NFE


def test_heun_sampler_reproduces_a_gaussian_mixture() -> None:
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    D = gaussian_mixture_denoiser(means, weights, std=0.1)
    x = 80 * torch.randn(4000, 2, dtype=torch.float64)
    out = sample_heun(D, x, append_zero(karras_sigmas(40, dtype=torch.float64)))
    left = out[:, 0] < 0
    assert left.double().mean().item() == pytest.approx(0.3, abs=0.03)
    torch.testing.assert_close(out[left].mean(0), means[0], atol=0.05, rtol=0)
    torch.testing.assert_close(out[~left].mean(0), means[1], atol=0.05, rtol=0)
    assert out[~left].std(0).mean().item() == pytest.approx(0.1, rel=0.2)


# ------------------------------------------------------------------ consistency samplers
def test_onestep_and_multistep_with_the_exact_consistency_function() -> None:
    f = gaussian_consistency_fn(SD)
    z = torch.randn(20000, 1, 1, 1, dtype=torch.float64)
    x = sample_onestep(f, z)
    assert x.std().item() == pytest.approx(math.sqrt(SD**2 + 0.002**2), rel=0.03)
    # multistep: deterministic re-noising shows the sqrt(tau^2 - eps^2) scale
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    z0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    out = sample_multistep(f, z0, [80.0, 0.585], noise=ones, clip_denoised=False)
    want = math.sqrt(0.585**2 - 0.002**2) * math.sqrt((SD**2 + 0.002**2) / (SD**2 + 0.585**2))
    assert out.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="descending"):
        sample_multistep(f, z0, [0.5, 0.6])


def test_seeded_noise_does_not_depend_on_batch_composition() -> None:
    a = SeededNoise([1, 2, 3]).randn((2, 4, 4))
    b = SeededNoise([3, 1]).randn((2, 4, 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])


def test_ema_update() -> None:
    src, tgt = nn.Linear(3, 3), nn.Linear(3, 3)
    before = tgt.weight.detach().clone()
    ema_update_(tgt, src, 0.9)
    torch.testing.assert_close(tgt.weight, 0.9 * before + 0.1 * src.weight)
    ema_update_(tgt, src, 0.0)
    assert torch.equal(tgt.weight, src.weight)
    keep = tgt.weight.detach().clone()
    ema_update_(tgt, nn.Linear(3, 3), 1.0)
    assert torch.equal(tgt.weight, keep)
