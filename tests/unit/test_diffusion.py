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
    ref = [
        80,
        57.59,
        40.79,
        28.37,
        19.35,
        12.91,
        8.401,
        5.315,
        3.257,
        1.923,
        1.088,
        0.5853,
        0.2964,
        0.1395,
        0.0599,
        0.0229,
        0.0075,
        0.002,
    ]  # reference.md 1.1
    for got, want in zip(s.tolist(), ref, strict=True):
        assert got == pytest.approx(want, rel=5e-3)  # printed to 2-4 significant digits
    assert s[11].item() == pytest.approx(0.585, abs=1e-3)  # the CIFAR-10 CD 2-step tau
    s32 = karras_sigmas(18)
    assert s32[0].item() == 80.0 and s32[-1].item() == torch.tensor(0.002).item()
    # the closed form in the paper's ascending index: t_i, i = 1..N, is the flipped grid
    i = torch.arange(1, 19, dtype=torch.float64)
    t = (0.002 ** (1 / 7) + (i - 1) / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(s.flip(0), t)
    other = karras_sigmas(5, sigma_min=0.01, sigma_max=10.0, rho=3.0, dtype=torch.float64)
    assert other[0].item() == 10.0 and other[-1].item() == 0.01 and len(other) == 5
    assert bool((other[1:] < other[:-1]).all())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(num_scales=1), "num_scales"),
        (dict(num_scales=18, sigma_min=0.0), "sigma_min"),
        (dict(num_scales=18, sigma_min=80.0), "sigma_min must be < sigma_max"),
        (dict(num_scales=18, rho=0), "rho"),
    ],
)
def test_karras_grid_bad_arguments_name_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        karras_sigmas(**kwargs)


# ------------------------------------------------------------------ N(k), mu(k)
TABLE = [  # reference.md 1.5: k, N, mu (code), mu (paper); s0 2, s1 150, mu0 0.9, K 800k
    (0, 2, 0.810, 0.900),
    (1_000, 6, 0.9587, 0.9655),
    (10_000, 17, 0.98692, 0.98768),
    (100_000, 54, 0.99603, 0.99611),
    (200_000, 76, 0.99719, 0.99723),
    (400_000, 107, 0.99801, 0.99803),
    (740_000, 146, 0.99855, 0.99856),
    (800_000, 151, 0.99860, 0.99861),
]


@pytest.mark.parametrize(("k", "n", "mu_code", "mu_paper"), TABLE)
def test_adaptive_schedule_reproduces_the_reference_table(k, n, mu_code, mu_paper) -> None:
    assert adaptive_schedule(k, 800_000, 2, 150, 0.9, "code") == (
        n,
        pytest.approx(mu_code, abs=6e-5),
    )
    assert adaptive_schedule(k, 800_000, 2, 150, 0.9, "paper") == (
        n,
        pytest.approx(mu_paper, abs=6e-5),
    )
    # the object's defaults are the CIFAR-10 CT values (s0 2, s1 150, mu0 0.9, code variant)
    assert AdaptiveSchedule(800_000)(k) == (n, pytest.approx(mu_code, abs=6e-5))


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
    assert AdaptiveSchedule(800_000, variant="paper")(0) == (2, pytest.approx(0.9))
    assert AdaptiveSchedule(1000)(5000) == (151, pytest.approx(0.9 ** (2 / 150)))  # k > K clamps
    with pytest.raises(ValueError, match="total_steps"):
        AdaptiveSchedule(0)
    with pytest.raises(ValueError, match="step"):
        adaptive_schedule(-1, 10)
    with pytest.raises(ValueError, match="mu0"):
        AdaptiveSchedule(10, mu0=1.0)
    # iCT: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K/(log2 floor(s1/s0) + 1)); K' = 100
    ict = ImprovedSchedule(total_steps=800)
    assert [ict(k)[0] for k in (0, 99, 100, 199, 200, 600, 699, 700, 799)] == [
        11,
        11,
        21,
        21,
        41,
        641,
        641,
        1281,
        1281,
    ]
    assert ict(10**6) == (1281, 0.0)
    # a ratio that is no power of 2: s1/s0 = 100 -> log2(100) + 1 = 7.64 stages, K' = 130
    ict = ImprovedSchedule(total_steps=1000, s0=10, s1=1000)
    assert [ict(k)[0] for k in (129, 130, 779, 780, 909, 910)] == [11, 21, 321, 641, 641, 1001]
    with pytest.raises(ValueError, match="total_steps"):
        ImprovedSchedule(total_steps=0)


def test_describe_curriculum_states_that_it_stretches_with_the_run_length() -> None:
    from cmexp.diffusion import describe_curriculum

    assert (
        describe_curriculum(FixedSchedule(120, 0.99)) == "fixed N = 120, mu = 0.99 at every step"
    )
    short, full = (
        describe_curriculum(AdaptiveSchedule(800)),
        describe_curriculum(AdaptiveSchedule(800_000)),
    )
    assert "k = 0, 200, 400, 600, 800: N = 2, " in short and short.endswith(
        "K = trainer.max_steps = 800, so a shorter or longer run changes N(k) and mu(k)"
    )
    # N(k) depends on k/K only: k = 0, K/4, K/2, 3K/4, K give the reference table's N at 0, 200k,
    # 400k and 800k of 800k, and ceil(sqrt(0.75 (151^2 - 2^2) + 2^2) - 1) + 1 = 131 at 3K/4
    assert "N = 2, 76, 107, 131, 151; " in short and "N = 2, 76, 107, 131, 151; " in full
    assert ", 151; mu = 0.81, " in full
    assert "N = 11, 11, 21, 41, 41; mu = 0, 0, 0, 0, 0;" in describe_curriculum(
        ImprovedSchedule(total_steps=800, s0=10, s1=40)
    )


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
    for cls in (EDMPrecond, CMPrecond):
        seen.clear()
        cls(Spy())(torch.zeros(2, 3, 8, 8), sigma)
        cls(Spy(), c_noise_scale=250.0)(torch.zeros(2, 3, 8, 8), sigma)
        torch.testing.assert_close(seen[0], sigma.log() / 4)
        torch.testing.assert_close(seen[1], 1000 * sigma.log() / 4)


def test_precond_applies_the_scalings_around_the_net() -> None:
    """D = c_skip x + c_out F(c_in x) for both wrappers, with scalar or per-sample sigma."""
    torch.manual_seed(0)

    class Fixed(_Wild):
        def forward(self, x, noise_labels, class_labels=None):
            return torch.tanh(x) + noise_labels[:, None, None, None]

    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=torch.float64)
    for cls, scal in ((EDMPrecond, edm_scalings), (CMPrecond, boundary_scalings)):
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in scal(sigma))
        want = c_skip * x + c_out * (torch.tanh(c_in * x) + sigma.log().view(-1, 1, 1, 1) / 4)
        out = cls(Fixed())(x, sigma)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        one = cls(Fixed())(x, 0.7)
        torch.testing.assert_close(one[1], want[1])
    with pytest.raises(ValueError, match="sigma"):
        CMPrecond(Fixed())(x, torch.ones(2))
    with pytest.raises(ValueError, match="sigma_data"):
        CMPrecond(Fixed(), sigma_data=0.0)


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
        x1 = step(
            D, x0, torch.tensor(s, dtype=torch.float64), torch.tensor(s - h, dtype=torch.float64)
        )
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
    for n in (2, 18, 40):  # N noise levels + a final Euler step to 0: 2N - 1 NFE
        calls.clear()
        sample_heun(D, 80 * x0, append_zero(karras_sigmas(n, dtype=torch.float64)))
        assert len(calls) == 2 * n - 1  # N = 18: CM paper Table 1's EDM at 35 NFE
        calls.clear()
        sample_euler(D, 80 * x0, append_zero(karras_sigmas(n, dtype=torch.float64)))
        assert len(calls) == n
    # with the final step to sigma = 0 the result is a sample of N(0, sd^2): exact D gives
    # x(0) = x(80) sd/sqrt(sd^2 + 80^2)
    out = sample_heun(D0, 80 * x0, append_zero(karras_sigmas(200, dtype=torch.float64)))
    torch.testing.assert_close(out, _exact(80 * x0, 80.0, 0.0), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="descending"):
        sample_heun(D0, x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sigma_next > 0"):
        heun_step(D0, x0, 1.0, 0.0)


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
    with pytest.raises(ValueError, match="sigma_min"):
        sample_multistep(f, z0, [80.0, 0.001])


def test_multistep_renoising_scale_clipping_and_sample_std() -> None:
    f = gaussian_consistency_fn(SD)
    eps = 0.002
    taus = [80.0, 5.0, 0.585, eps]
    seen = []

    def halves(x):
        seen.append(x.clone())
        return torch.full_like(x, 0.5)

    z = torch.full((2, 1, 2, 2), 0.01, dtype=torch.float64)
    out = sample_multistep(f, z, taus, noise=halves, clip_denoised=False)
    want = f(80.0 * z, 80.0)
    for tau in taus[1:]:
        want = f(want + math.sqrt(tau**2 - eps**2) * 0.5, tau)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0)
    assert (
        len(seen) == 3
    )  # NFE = len(sigmas); the last tau = eps adds sqrt(eps^2 - eps^2) = 0 noise

    # clipping: each output is clamped to [-1, 1] before re-noising, and the result too
    big = lambda x, s, c=None: 3 * x + 5  # noqa: E731
    out = sample_multistep(big, torch.zeros(1, 1, 1, 1), [80.0, 1.0], noise=torch.zeros_like)
    assert out.item() == 1.0
    out = sample_multistep(
        big, torch.zeros(1, 1, 1, 1), [80.0, 1.0], noise=torch.zeros_like, clip_denoised=False
    )
    assert out.item() == 3 * 5 + 5  # f(f(0) + 0) with f(0) = 5 unclipped

    # the exact consistency function produces N(0, sd^2 + eps^2) samples with any tau list
    torch.manual_seed(3)
    z = torch.randn(20000, 1, 1, 1, dtype=torch.float64)
    for taus in ([80.0, 0.585], [80.0, 5.0, 0.585, eps]):
        x = sample_multistep(f, z, taus, clip_denoised=False)
        assert x.std().item() == pytest.approx(math.sqrt(SD**2 + eps**2), rel=0.03)
        assert x.mean().item() == pytest.approx(0.0, abs=0.02)


def test_seeded_noise_does_not_depend_on_batch_composition() -> None:
    a = SeededNoise([1, 2, 3]).randn((2, 4, 4))
    b = SeededNoise([3, 1]).randn((2, 4, 4))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    # a multistep sampler driven by per-seed noise gives each seed the same image in any batch
    f = lambda x, s, c=None: torch.tanh(x / s)  # noqa: E731
    full_noise = SeededNoise([7, 8, 9])
    full = sample_multistep(
        f, full_noise.randn((1, 4, 4)), [80.0, 2.0, 0.5], noise=full_noise.randn_like
    )
    part_noise = SeededNoise([9, 7])
    part = sample_multistep(
        f, part_noise.randn((1, 4, 4)), [80.0, 2.0, 0.5], noise=part_noise.randn_like
    )
    assert torch.equal(full[2], part[0]) and torch.equal(full[0], part[1])
    with pytest.raises(ValueError, match="seeds"):
        SeededNoise([1, 2]).randn_like(torch.zeros(3, 1))


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
    # buffers are copied whatever the rate; bad rates raise
    bn_s, bn_t = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    bn_s.running_mean.fill_(2.0)
    ema_update_(bn_t, bn_s, 0.99)
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)
    with pytest.raises(ValueError, match="rate"):
        ema_update_(tgt, src, 1.5)


@pytest.mark.parametrize("make_net", [lambda: nn.Conv2d(3, 3, 3, padding=1), _Wild])
def test_boundary_condition_is_exact_in_float64(make_net) -> None:
    """float64: f(x, sigma_min) = x bit for bit, with sigma a Python float (built in float64,
    not rounded through float32: the error was ~5e-10) or a float64 tensor."""
    torch.manual_seed(0)
    net = make_net().double()
    if isinstance(net, nn.Conv2d):  # a random conv net as F(x_in, noise_labels, labels)
        conv = net
        net = _Wild()
        net.forward = lambda x, noise_labels, class_labels=None: (
            conv(x) * noise_labels.view(-1, 1, 1, 1)
        )
    f = CMPrecond(net, sigma_min=0.002)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for sigma in (
        0.002,
        torch.tensor(0.002, dtype=torch.float64),
        torch.full((4,), 0.002, dtype=torch.float64),
    ):
        out = f(x, sigma)
        assert out.dtype == torch.float64
        assert torch.equal(out, x), (out - x).abs().max()
    assert not torch.allclose(f(x, 1.0), x)


def test_float64_multistep_sampling_uses_exact_sigmas() -> None:
    """Alg. 1 in float64 with Python-float levels equals the official sampler's loop with
    float64 sigma tensors bit for bit (it drifted by up to 3e-6 when a float sigma was rounded
    through float32)."""
    torch.manual_seed(0)
    f = CMPrecond(_Wild().double(), sigma_min=0.002)
    z = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    fresh = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    sigmas = [80.0, 3.2568, 0.585]
    out = sample_multistep(f, z, sigmas, 0.002, noise=lambda x: fresh)

    def s64(s: float) -> torch.Tensor:
        return torch.full((4,), s, dtype=torch.float64)

    x = f(80.0 * z, s64(80.0))
    for tau in sigmas[1:]:
        x = x.clamp(-1, 1) + math.sqrt(tau**2 - 0.002**2) * fresh
        x = f(x, s64(tau))
    assert torch.equal(out, x.clamp(-1, 1))
