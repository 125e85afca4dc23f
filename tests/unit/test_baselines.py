"""The paper's baselines against closed forms: DDIM / DDPM / EDM's stochastic sampler on the
exact Gaussian denoiser, the DDPM-line noise schedules (zero terminal SNR, v-prediction), and
progressive distillation's target and loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from cmexp.diffusion import (
    SeededNoise,
    VPrecond,
    VPSchedule,
    alpha_bar_to_sigma,
    append_zero,
    cosine_alpha_bars,
    ddim_step,
    euler_step,
    gaussian_denoiser,
    karras_sigmas,
    linear_alpha_bars,
    rescale_zero_terminal_snr,
    sample_ddim,
    sample_ddpm,
    sample_edm_sde,
    sample_euler,
    sample_heun,
    sigma_to_alpha_bar,
    ve_to_vp,
    vp_to_ve,
)
from cmexp.losses import L2Distance, SNRPlusOneWeighting, TruncatedSNRWeighting
from cmexp.methods.pd.loss import ProgressiveDistillationLoss, progressive_target

SD = 0.5
F64 = torch.float64


def _exact_ode(x, s0, s1):
    """The PF-ODE of N(0, sd^2) data maps x at s0 to x sqrt((sd^2 + s1^2)/(sd^2 + s0^2))."""
    return x * math.sqrt((SD**2 + s1**2) / (SD**2 + s0**2))


class _Counting:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x, s, c=None):
        self.calls += 1
        return self.fn(x, s, c)


# ------------------------------------------------------------------ DDIM
def test_ddim_eta0_is_the_euler_step_in_sigma() -> None:
    """DDIM (eta = 0) written in sigma, ``D + (s'/s)(x - D)``, is the PF-ODE Euler step
    ``x + (s' - s)(x - D)/s`` exactly (Song et al. 2021, Sec. 4.3), on any denoiser."""
    torch.manual_seed(0)
    means = torch.tensor([[-1.0, 0.5], [0.8, -0.3]], dtype=F64)
    from cmexp.diffusion import gaussian_mixture_denoiser

    D = gaussian_mixture_denoiser(means, torch.tensor([0.4, 0.6], dtype=F64), std=0.2)
    x = 10 * torch.randn(32, 2, dtype=F64)
    for s, s_next in [(10.0, 3.0), (1.0, 0.5), (0.3, 0.0)]:
        torch.testing.assert_close(
            ddim_step(D, x, s, s_next), euler_step(D, x, s, s_next), atol=1e-12, rtol=1e-12
        )
    sig = append_zero(karras_sigmas(12, dtype=F64))
    torch.testing.assert_close(
        sample_ddim(D, 80 * x, sig), sample_euler(D, 80 * x, sig), atol=1e-6, rtol=1e-7
    )  # rounding only


def test_ddim_converges_to_the_exact_pf_ode_solution_at_first_order() -> None:
    D = _Counting(gaussian_denoiser(SD))
    x = torch.randn(64, 1, 2, 2, dtype=F64)
    exact = _exact_ode(80 * x, 80.0, 0.0)
    errors = []
    for n in (16, 32, 64, 128):
        D.calls = 0
        out = sample_ddim(D, 80 * x, append_zero(karras_sigmas(n, dtype=F64)))
        assert D.calls == n  # NFE = steps
        errors.append((out - exact).abs().max().item())
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(r == pytest.approx(2.0, abs=0.15) for r in ratios), ratios  # first order
    assert errors[-1] < 0.04


def test_ddim_with_eta_is_per_seed_and_eta_one_is_ddpm() -> None:
    D = gaussian_denoiser(SD)
    sig = append_zero(karras_sigmas(10, dtype=F64))
    z = SeededNoise(range(6)).randn((1, 2, 2), dtype=F64)
    a = sample_ddim(D, 80 * z, sig, eta=1.0, noise=SeededNoise(range(6)).randn_like)
    b = sample_ddpm(D, 80 * z, sig, noise=SeededNoise(range(6)).randn_like)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)  # DDIM eta = 1 == DDPM posterior
    # image i depends only on seed i: the same images from a batch of 2 seeds
    part = sample_ddim(D, 80 * z[2:4], sig, eta=0.5, noise=SeededNoise(range(2, 4)).randn_like)
    whole = sample_ddim(D, 80 * z, sig, eta=0.5, noise=SeededNoise(range(6)).randn_like)
    torch.testing.assert_close(part, whole[2:4])
    assert not torch.allclose(whole, sample_ddim(D, 80 * z, sig))  # eta > 0 is stochastic
    with pytest.raises(ValueError, match=r"^eta must be >= 0"):
        sample_ddim(D, 80 * z, sig, eta=-0.1)
    with pytest.raises(ValueError, match=r"^eta must be >= 0"):
        ddim_step(D, z, 1.0, 0.5, eta=-1)


# ------------------------------------------------------------------ DDPM
def _ddpm_variance(sig: list[float]) -> float:
    """Var of DDPM ancestral sampling with the exact Gaussian D, by the linear recursion
    v_s = a^2 v_t + c^2 (a = k + (s^2/t^2)(1 - k), k = sd^2/(sd^2 + t^2))."""
    v = sig[0] ** 2
    for s, s_next in itertools.pairwise(sig):
        k = SD**2 / (SD**2 + s**2)
        a = k + (s_next**2 / s**2) * (1 - k)
        v = a * a * v + s_next**2 * (1 - s_next**2 / s**2)
    return v


def test_ddpm_ancestral_sampling_of_the_exact_gaussian_reaches_sd_squared() -> None:
    torch.manual_seed(0)
    D = _Counting(gaussian_denoiser(SD))
    sig = append_zero(karras_sigmas(640, dtype=F64))
    z = torch.randn(20000, 1, dtype=F64)
    out = sample_ddpm(D, 80 * z, sig)
    assert D.calls == 640
    predicted = _ddpm_variance(sig.tolist())
    assert out.var().item() == pytest.approx(predicted, rel=0.03)  # Monte Carlo = recursion
    assert out.mean().item() == pytest.approx(0.0, abs=0.01)
    assert out.var().item() == pytest.approx(SD**2, rel=0.04)  # the data variance at the end
    # the plug-in posterior mean loses variance at first order in the step size
    gaps = [
        SD**2 - _ddpm_variance(append_zero(karras_sigmas(n, dtype=F64)).tolist())
        for n in (80, 160, 320, 640)
    ]
    assert all(g > 0 for g in gaps) and gaps[-1] < 0.01
    assert all(a / b == pytest.approx(2.0, abs=0.4) for a, b in itertools.pairwise(gaps))


# ------------------------------------------------------------------ EDM stochastic sampler
def test_edm_stochastic_sampler_with_no_churn_is_heun_and_with_churn_keeps_the_variance() -> None:
    D = _Counting(gaussian_denoiser(SD))
    sig = append_zero(karras_sigmas(18, dtype=F64))
    x = 80 * torch.randn(8, 1, 2, 2, dtype=F64)
    out = sample_edm_sde(D, x, sig, s_churn=0.0)
    assert D.calls == 35  # 2N - 1 as Heun
    assert torch.equal(out, sample_heun(gaussian_denoiser(SD), x, sig))
    torch.manual_seed(0)
    z = torch.randn(20000, 1, dtype=F64)
    noisy = sample_edm_sde(
        gaussian_denoiser(SD),
        80 * z,
        append_zero(karras_sigmas(64, dtype=F64)),
        s_churn=40,
        s_tmin=0.05,
        s_tmax=50,
        s_noise=1.0,
    )
    assert noisy.var().item() == pytest.approx(SD**2, rel=0.05)
    seeds = SeededNoise(range(4))
    a = sample_edm_sde(
        gaussian_denoiser(SD),
        80 * seeds.randn((1, 2, 2), dtype=F64),
        sig,
        s_churn=10,
        noise=SeededNoise(range(4)).randn_like,
    )
    b = sample_edm_sde(
        gaussian_denoiser(SD),
        80 * SeededNoise(range(2, 4)).randn((1, 2, 2), dtype=F64),
        sig,
        s_churn=10,
        noise=SeededNoise(range(2, 4)).randn_like,
    )
    torch.testing.assert_close(a[2:], b)
    with pytest.raises(ValueError, match="^s_churn must be >= 0"):
        sample_edm_sde(D, x, sig, s_churn=-1)


# ------------------------------------------------------------------ schedules of the DDPM line
@pytest.mark.parametrize("make", [linear_alpha_bars, cosine_alpha_bars])
def test_zero_terminal_snr_rescaling(make) -> None:
    ab = make(1000)
    assert ab.dtype == F64 and len(ab) == 1000 and bool((ab[1:] < ab[:-1]).all())
    assert ab[-1].item() > 0  # the published schedules leave signal at t = T ...
    zs = rescale_zero_terminal_snr(ab)
    assert zs[-1].item() == 0.0  # ... the rescaled one none: SNR_T = 0 exactly
    assert zs[0].item() == pytest.approx(ab[0].item(), rel=1e-12)  # alpha_bar_1 kept
    assert bool((zs[1:] < zs[:-1]).all())
    sched = VPSchedule(ab, zero_terminal_snr=True)
    # sigma = sqrt((1 - alpha_bar) / alpha_bar), written out (not the code's own mapping)
    assert math.isinf(sched.sigma_max) and sched.sigma_min == pytest.approx(
        math.sqrt((1 - ab[0].item()) / ab[0].item()), rel=1e-12
    )
    assert math.isinf(sched.plan(4)[0])  # trailing timesteps: the first step starts at t = T


def test_published_schedule_values_and_the_sigma_mapping() -> None:
    ab = linear_alpha_bars(1000)
    assert ab[0].item() == pytest.approx(1 - 1e-4) and ab[-1].item() == pytest.approx(
        4.036e-5, rel=1e-3
    )
    cos = cosine_alpha_bars(1000)
    assert cos[-1].item() < 1e-6 and cos[0].item() == pytest.approx(0.99996, abs=2e-5)
    sig = alpha_bar_to_sigma(ab)
    torch.testing.assert_close(sig, torch.sqrt((1 - ab) / ab))  # sigma = sqrt((1 - ab) / ab)
    assert sig[0].item() == pytest.approx(0.0100005, rel=1e-6)  # beta_1 = 1e-4: sqrt(1e-4/0.9999)
    torch.testing.assert_close(sigma_to_alpha_bar(sig), 1 / (1 + sig**2))  # alpha_bar
    torch.testing.assert_close(sigma_to_alpha_bar(sig), ab)
    assert alpha_bar_to_sigma(torch.tensor(0.0)).item() == math.inf
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    s = torch.tensor([0.1, 1.0, 30.0], dtype=F64)
    torch.testing.assert_close(vp_to_ve(ve_to_vp(x, s), s), x)
    torch.testing.assert_close(ve_to_vp(x, s)[1], x[1] / math.sqrt(2))
    sched = VPSchedule(ab)
    plan = sched.plan(4)
    want = [math.sqrt((1 - ab[t - 1].item()) / ab[t - 1].item()) for t in (1000, 750, 500, 250)]
    assert plan == pytest.approx(want, rel=1e-12)  # trailing spacing
    d = sched.draw(4000)
    assert set(d.tolist()) <= set(sig.float().tolist()) and len(set(d.tolist())) > 900


@pytest.mark.parametrize(
    ("alpha_bars", "message"),
    [
        (
            [0.9, 0.95, 0.5],
            (
                r"^vp_schedule.alpha_bars must be strictly decreasing .* "
                r"got vp_schedule.alpha_bars\[1\]=0.95 >= vp_schedule.alpha_bars\[0\]=0.9"
            ),
        ),
        ([0.9, 0.9], "^vp_schedule.alpha_bars must be strictly decreasing"),
        ([1.5, 0.5], r"^vp_schedule.alpha_bars must lie in \[0, 1\]"),
        ([0.5], "^vp_schedule.alpha_bars must hold at least 2"),
    ],
)
def test_bad_schedules_name_the_key(alpha_bars, message) -> None:
    with pytest.raises(ValueError, match=message):
        VPSchedule(alpha_bars)
    with pytest.raises(ValueError, match="beta_end must be in"):
        linear_alpha_bars(10, 1e-4, 1.5)


class _ExactVPNet(nn.Module):
    """A raw network that outputs the exact eps / v / x0 of N(0, sd^2) data from the VP input
    and c_noise = (2/pi) arctan(sigma) (VPrecond's noise label with c_noise_scale = 1)."""

    img_resolution, img_channels, label_dim = 2, 1, 0

    def __init__(self, prediction: str) -> None:
        super().__init__()
        self.prediction = prediction

    def forward(self, x_vp, c_noise, labels=None):
        sigma = torch.tan(c_noise * math.pi / 2)
        inf = c_noise >= 1
        a = torch.where(inf, torch.zeros_like(sigma), 1 / (1 + sigma**2).sqrt()).view(-1, 1, 1, 1)
        sv = torch.where(inf, torch.ones_like(sigma), sigma / (1 + sigma**2).sqrt()).view(
            -1, 1, 1, 1
        )
        # x0 | x_vp for x0 ~ N(0, sd^2), x_vp = a x0 + sv eps: E[x0 | x_vp] = a sd^2/(a^2 sd^2 + sv^2) x_vp
        x0 = a * SD**2 / (a**2 * SD**2 + sv**2) * x_vp
        eps = (x_vp - a * x0) / sv
        return {"x0": x0, "eps": eps, "v": a * eps - sv * x0}[self.prediction]


def test_v_eps_and_x0_prediction_agree_on_the_exact_gaussian_denoiser() -> None:
    x = torch.randn(4, 1, 2, 2, dtype=F64)
    exact = gaussian_denoiser(SD)
    for sigma in (torch.tensor(v, dtype=F64) for v in (0.01, 0.3, 2.0, 40.0)):
        want = exact(x * math.sqrt(SD**2 + sigma**2), sigma)
        outs = [
            VPrecond(_ExactVPNet(p), prediction=p)(x * math.sqrt(SD**2 + sigma**2), sigma)
            for p in ("eps", "v", "x0")
        ]
        for out in outs:
            torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)
    # at zero terminal SNR (sigma = inf) the input is the VP state and D is E[x0] = 0 here
    v = VPrecond(_ExactVPNet("v"), sigma_max=math.inf, prediction="v")
    assert v(x, math.inf).abs().max().item() == 0.0
    with pytest.raises(
        ValueError, match="^model.precond.prediction=eps cannot be used with a zero-terminal"
    ):
        VPrecond(_ExactVPNet("eps"), sigma_max=math.inf, prediction="eps")
    with pytest.raises(ValueError, match="^model.precond.prediction must be one of eps, v, x0"):
        VPrecond(_ExactVPNet("v"), prediction="score")


def test_zero_snr_sampling_starts_from_pure_noise() -> None:
    """From alpha_bar = 0 the first DDIM step is D(z, inf) + sigma_1 z; DDPM and Euler start
    there too, Heun and the EDM sampler refuse an infinite first level."""
    model = VPrecond(_ExactVPNet("v"), sigma_max=math.inf, prediction="v").double()
    sched = VPSchedule(cosine_alpha_bars(100), zero_terminal_snr=True)
    sig = torch.tensor([*sched.plan(10), 0.0], dtype=F64)
    z = torch.randn(16, 1, 2, 2, dtype=F64)
    first = sample_ddim(model, z, sig[:2])
    torch.testing.assert_close(first, model(z, math.inf) + sig[1] * z)
    out = sample_ddim(model, z, sig)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(sample_euler(model, z, sig), out, atol=1e-10, rtol=1e-10)
    assert torch.isfinite(sample_ddpm(model, z, sig)).all()
    for sampler in (sample_heun, sample_edm_sde):
        with pytest.raises(ValueError, match="needs a finite sigmas"):
            sampler(model, z, sig)


# ------------------------------------------------------------------ progressive distillation
def test_weightings_truncated_snr_and_the_v_target() -> None:
    s = torch.tensor([0.25, 1.0, 4.0], dtype=F64)
    torch.testing.assert_close(
        TruncatedSNRWeighting()(s), torch.tensor([16.0, 1.0, 1.0], dtype=F64)
    )
    # SNR + 1 on the x error is the v error for a fixed z_t (Salimans & Ho 2022, Sec. 4)
    x0, eps = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    x_hat = x0 + 0.1 * torch.randn(3, 5, dtype=F64)
    a, sv = (1 / (1 + s**2).sqrt())[:, None], (s / (1 + s**2).sqrt())[:, None]
    z = a * x0 + sv * eps
    eps_hat = (z - a * x_hat) / sv
    v_err = ((a * eps_hat - sv * x_hat) - (a * eps - sv * x0)).square().sum(1)
    torch.testing.assert_close(v_err, SNRPlusOneWeighting()(s) * (x_hat - x0).square().sum(1))


def _two_ddim_steps(D, x, s0, s1, s2):
    return ddim_step(D, ddim_step(D, x, s0, s1), s1, s2)  # levels as float64 tensors


def test_one_student_step_on_the_pd_target_equals_two_teacher_ddim_steps() -> None:
    D = gaussian_denoiser(SD)
    x = 5 * torch.randn(6, 1, 2, 2, dtype=F64)
    t, mid, nxt = (torch.full((6,), v, dtype=F64) for v in (5.0, 2.0, 0.7))
    target = progressive_target(D, x, t, mid, nxt)
    student_step = ddim_step(lambda x_, s_, c_=None: target, x, 5.0, 0.7)
    levels = [torch.tensor(v, dtype=F64) for v in (5.0, 2.0, 0.7)]
    torch.testing.assert_close(
        student_step, _two_ddim_steps(D, x, *levels), atol=1e-12, rtol=1e-12
    )
    # as the two steps shrink the target tends to the teacher's own denoised value
    errs = []
    for h in (0.4, 0.2, 0.1):
        tg = progressive_target(D, x, t, t - h, t - 2 * h)
        errs.append((tg - D(x, t)).abs().max().item())
    assert errs[0] > errs[1] > errs[2]


def _exact_student(teacher_grid: list[float]):
    """The exact one-step PD student of a linear (Gaussian) teacher on ``teacher_grid``
    (2N + 1 levels): D_s(x, s_i) = g_i x with the g that makes one DDIM step s_i -> s_{i+1}
    equal two teacher steps."""
    gains = {}
    for i in range(0, len(teacher_grid) - 1, 2):
        t, mid, nxt = teacher_grid[i : i + 3]
        k = [SD**2 / (SD**2 + s**2) for s in (t, mid)]
        a = (k[0] + mid / t * (1 - k[0])) * (k[1] + nxt / mid * (1 - k[1]))
        r = nxt / t
        gains[round(t, 12)] = (a - r) / (1 - r)

    def D(x, sigma, c=None):
        s = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        g = torch.tensor([gains[round(float(v), 12)] for v in s], dtype=F64)
        return g.view(-1, *([1] * (x.ndim - 1))) * x

    return D


def test_pd_loss_of_the_exact_student_is_zero_and_it_samples_like_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = gaussian_denoiser(SD)
    grid = karras_sigmas(9, dtype=F64)  # teacher: 8 steps -> student: 4 steps on grid[::2]
    student = _exact_student(grid.tolist())
    images = SD * torch.randn(64, 1, 2, 2, dtype=F64)
    out = ProgressiveDistillationLoss(L2Distance())(student, teacher, images, grid)
    assert out.loss.shape == (64,) and out.loss.abs().max().item() < 1e-20
    assert set(out.sigma.tolist()) <= set(grid[::2].tolist())
    # its 4 DDIM steps are the teacher's 8 (the PD claim, exact for the exact student)
    z = torch.randn(8, 1, 2, 2, dtype=F64)
    torch.testing.assert_close(
        sample_ddim(student, 80 * z, grid[::2]),
        sample_ddim(teacher, 80 * z, grid),
        atol=1e-10,
        rtol=1e-10,
    )
    # a wrong student is penalised, more at low noise (truncated SNR weighting)
    bad = ProgressiveDistillationLoss(L2Distance())(teacher, teacher, images, grid)
    assert bad.loss.mean().item() > 0
    with pytest.raises(ValueError, match="2N \\+ 1"):
        ProgressiveDistillationLoss(L2Distance())(student, teacher, images, grid[:4])
