"""sCT / sCD (Lu & Song 2024) against closed forms: the TrigFlow wrapper and its sigma interface,
the EDM -> TrigFlow teacher conversion, the JVP tangent against finite differences, and the
exact consistency function of Gaussian data giving zero loss and zero gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cmexp.diffusion import (
    DenoiserTrigFlow,
    EDMPrecond,
    EDMTrigFlowPrecond,
    TrigFlowPrecond,
    gaussian_denoiser,
    sample_multistep,
    sample_trigflow,
    sigma_to_trigflow,
    trigflow_to_sigma,
)
from cmexp.methods.scm.loss import AdaptiveWeight, FiniteDifferenceTangent, JVPTangent, SCMLoss
from cmexp.nets import TinyUNet

SD = 0.5  # sigma_data of the TrigFlow process
S = 0.8  # std of the Gaussian data (!= SD, so the exact consistency function is not the identity)


class GaussianTrigFlowNet(nn.Module):
    """Raw net whose TrigFlowPrecond is the exact consistency model of data ~ N(0, S^2 I), times
    ``(1 + theta)`` (theta = 0: exact). ``f(x_t, t) = x_t S / sqrt(S^2 cos^2 t + SD^2 sin^2 t)``
    (the EDM closed form x_sigma S / sqrt(S^2 + sigma^2) with sigma = SD tan t, x_sigma =
    x_t / cos t), so ``F = x_t (cos t - S / q) / (SD sin t)``, q = sqrt(S^2 cos^2 t + SD^2 sin^2 t)."""

    img_resolution, img_channels, label_dim = 4, 1, 0

    def __init__(self, c_noise_scale: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.c_noise_scale = c_noise_scale

    def forward(
        self, x_in: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        t = (noise_labels / self.c_noise_scale).to(x_in.dtype)[:, None, None, None]
        x_t = SD * x_in
        q = torch.sqrt(S**2 * torch.cos(t) ** 2 + SD**2 * torch.sin(t) ** 2)
        return (1 + self.theta) * x_t * (torch.cos(t) - S / q) / (SD * torch.sin(t))


def exact_f(x_t: Tensor, t: Tensor) -> Tensor:
    t = t[:, None, None, None]
    return x_t * S / torch.sqrt(S**2 * torch.cos(t) ** 2 + SD**2 * torch.sin(t) ** 2)


def tiny(channels: int = 1, dropout: float = 0.0) -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(img_resolution=8, img_channels=channels, model_channels=8, dropout=dropout)


# ------------------------------------------------------------------ the TrigFlow wrapper
def test_sigma_and_trigflow_times_roundtrip() -> None:
    sigma = torch.tensor([0.002, 0.5, 0.9824, 80.0], dtype=torch.float64)
    t = sigma_to_trigflow(sigma, SD)
    torch.testing.assert_close(trigflow_to_sigma(t, SD), sigma)
    assert float(t[-1]) == pytest.approx(1.56454, abs=1e-5)  # t_max = arctan(80 / 0.5)
    assert float(trigflow_to_sigma(torch.tensor(1.1, dtype=torch.float64), SD)) == pytest.approx(
        0.98238, abs=1e-5
    )


def test_sigma_interface_is_the_trigflow_consistency_function() -> None:
    model = TrigFlowPrecond(tiny()).eval()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.98, 40.0])
    t = torch.atan(sigma / SD)
    direct = model.consistency(x * torch.cos(t)[:, None, None, None], t)
    torch.testing.assert_close(model(x, sigma), direct)
    # f = cos t x_t - sin t sd F (sCM Eq. 7) and the boundary f(x, 0) = x exactly
    x_t = x * torch.cos(t)[:, None, None, None]
    manual = torch.cos(t)[:, None, None, None] * x_t - torch.sin(t)[
        :, None, None, None
    ] * SD * model.F(x_t, t)
    torch.testing.assert_close(direct, manual)
    torch.testing.assert_close(model(x, 0.0), x)
    assert model.describe() == {"name": "trigflow"} and model.t_max == pytest.approx(
        1.56454, abs=1e-5
    )


def test_gaussian_exact_model_maps_to_the_edm_closed_form() -> None:
    model = TrigFlowPrecond(GaussianTrigFlowNet()).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.5, 3.0, 60.0], dtype=torch.float64)
    want = x * S / torch.sqrt(S**2 + sigma**2)[:, None, None, None]
    torch.testing.assert_close(model(x, sigma), want)


def test_trigflow_sampler_equals_alg1_in_sigma() -> None:
    """sCM's 2-step sampler at (t_max, 1.1) is Alg. 1 with taus = sd tan(1.1) (eps = 0)."""
    model = TrigFlowPrecond(tiny()).eval()
    z = torch.randn(2, 1, 8, 8)
    gen = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    a = sample_trigflow(
        model, z, [model.t_max, 1.1], noise=lambda x: torch.randn(x.shape, generator=gen[0])
    )
    b = sample_multistep(
        model,
        z,
        [80.0, SD * math.tan(1.1)],
        sigma_min=0.0,
        noise=lambda x: torch.randn(x.shape, generator=gen[1]),
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ts entries must be TrigFlow times in"):
        sample_trigflow(model, z, [2.0])


# ------------------------------------------------------------------ EDM -> TrigFlow
def test_edm_trigflow_wrapper_equals_the_edm_denoiser_and_its_pf_ode() -> None:
    net = tiny()
    edm, trig = EDMPrecond(net).eval(), EDMTrigFlowPrecond(net).eval()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.02, 0.7, 30.0])
    torch.testing.assert_close(trig(x, sigma), edm(x, sigma), atol=1e-5, rtol=1e-5)  # f = D
    # dx_t/dt = sd F_teacher = -sin t x_sigma + (sd / cos t) (x_sigma - D) / sigma
    t = torch.atan(sigma / SD)
    c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    edm_ode = -s * x + SD / c * (x - edm(x, sigma)) / sigma[:, None, None, None]
    torch.testing.assert_close(trig.velocity(c * x, t), edm_ode, atol=1e-4, rtol=1e-4)
    # the generic denoiser conversion agrees with the exact one
    torch.testing.assert_close(
        DenoiserTrigFlow(edm, SD).velocity(c * x, t), edm_ode, atol=1e-4, rtol=1e-4
    )


# ------------------------------------------------------------------ the tangent
def test_jvp_tangent_equals_finite_differences() -> None:
    model = TrigFlowPrecond(GaussianTrigFlowNet()).double()
    with torch.no_grad():
        model.net.theta.fill_(0.3)
    x_t = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.6, 1.1, 1.5], dtype=torch.float64)
    v = torch.randn_like(x_t)

    def fn(a: Tensor, b: Tensor) -> Tensor:
        return model.F(a, b)

    jvp = JVPTangent()(fn, x_t, t, v)
    fd = FiniteDifferenceTangent(1e-4)(fn, x_t, t, v)
    torch.testing.assert_close(jvp, fd, atol=1e-7, rtol=1e-6)
    # a real network (float32, dropout shared by the two difference passes)
    net = TrigFlowPrecond(tiny(dropout=0.2)).train()
    x32, t32, v32 = x_t.float().repeat(1, 1, 2, 2), t.float(), torch.randn(4, 1, 8, 8)

    def fn32(a: Tensor, b: Tensor) -> Tensor:
        return net.F(a, b)

    torch.manual_seed(5)
    jvp32 = JVPTangent()(fn32, x32, t32, v32)
    torch.manual_seed(5)
    fd32 = FiniteDifferenceTangent(1e-2)(fn32, x32, t32, v32)
    assert (jvp32 - fd32).norm() / jvp32.norm() < 1e-2


def test_a_layer_without_forward_mode_ad_is_named() -> None:
    from tests.fakes import NoForwardADTinyUNet

    model = TrigFlowPrecond(NoForwardADTinyUNet(img_resolution=8, img_channels=1))
    with pytest.raises(
        ValueError,
        match=r"tangent=jvp: layer 'net.quant' \(Quantize\) of the network does not support forward-mode AD",
    ):
        JVPTangent().check(model)
    FiniteDifferenceTangent().check(model)  # the fallback needs nothing
    JVPTangent().check(TrigFlowPrecond(tiny()))  # TinyUNet supports it
    state = torch.get_rng_state()
    JVPTangent().check(TrigFlowPrecond(tiny()))
    assert torch.equal(state, torch.get_rng_state())  # the probe leaves the global RNG alone


# ------------------------------------------------------------------ the objective, closed form
def _weight() -> AdaptiveWeight:
    w = AdaptiveWeight(16).double()
    assert float(w(torch.tensor([0.3]).double()).detach().abs().max()) == 0.0  # w = 0 at init
    return w


@pytest.mark.parametrize(
    ("tangent", "tol"), [(JVPTangent(), 1e-10), (FiniteDifferenceTangent(1e-4), 1e-6)]
)
def test_scd_exact_consistency_function_gives_zero_loss_and_zero_gradient(
    tangent, tol: float
) -> None:
    model = TrigFlowPrecond(GaussianTrigFlowNet()).double()
    teacher = DenoiserTrigFlow(
        gaussian_denoiser(S), SD
    )  # the exact Gaussian denoiser, in TrigFlow
    loss_fn = SCMLoss(tangent, warmup_steps=0, sigma_data=SD, teacher=teacher)
    torch.manual_seed(0)
    x0 = S * torch.randn(16, 1, 4, 4, dtype=torch.float64)
    z = SD * torch.randn_like(x0)
    t = torch.rand(16, dtype=torch.float64) * 1.4 + 0.05
    out = loss_fn.terms(model, _weight(), x0, z, t)
    # df/dt = 0 along the exact ODE: the tangent vanishes for every sample
    assert float(out.tangent_norm.max()) < 1e-6
    assert float(out.loss.abs().max()) < 1e-12
    out.loss.sum().backward()
    assert abs(float(model.net.theta.grad)) < tol  # (finite differences: their O(eps^2) error)
    # a wrong model is pushed back: non-zero tangent and gradient
    with torch.no_grad():
        model.net.theta.fill_(0.2)
    model.net.theta.grad = None
    bad = loss_fn.terms(model, _weight(), x0, z, t)
    bad.loss.sum().backward()
    assert (
        float(bad.tangent_norm.min()) > 1e-3 and float(model.net.theta.grad) > 1e-3
    )  # theta is lowered


def _antithetic_batch(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs (x0 = m +- d, z) with the same x_t = cos t x0 + sin t z, where m = E[x0 | x_t]."""
    torch.manual_seed(1)
    t = torch.rand(n, dtype=torch.float64) * 1.4 + 0.05
    c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    x_t = torch.sqrt(S**2 * c**2 + SD**2 * s**2) * torch.randn(n, 1, 4, 4, dtype=torch.float64)
    m = c * S**2 / (S**2 * c**2 + SD**2 * s**2) * x_t
    d = 0.3 * torch.randn_like(x_t)
    x0 = torch.cat([m + d, m - d])
    t2, c2, s2 = t.repeat(2), c.repeat(2, 1, 1, 1), s.repeat(2, 1, 1, 1)
    z = (x_t.repeat(2, 1, 1, 1) - c2 * x0) / s2
    return x0, z, t2


def test_sct_exact_consistency_function_has_zero_gradient() -> None:
    """sCT's tangent uses the one-sample velocity cos t z - sin t x0; over antithetic pairs with the
    same x_t its mean is E[dx_t/dt | x_t], the exact ODE, so the two normalised tangents cancel and
    the gradient of the exact model vanishes (after the warm-up)."""
    model = TrigFlowPrecond(GaussianTrigFlowNet()).double()
    loss_fn = SCMLoss(JVPTangent(), warmup_steps=10, sigma_data=SD)
    x0, z, t = _antithetic_batch(8)
    out = loss_fn.terms(model, _weight(), x0, z, t, step=10)
    assert (
        out.warmup == 1.0 and float(out.tangent_norm.min()) > 1e-3
    )  # each sample's tangent is not 0
    out.loss.sum().backward()
    assert abs(float(model.net.theta.grad)) < 1e-9
    # during the warm-up (r < 1) or for a wrong model the gradient is not zero
    model.net.theta.grad = None
    loss_fn.terms(model, _weight(), x0, z, t, step=5).loss.sum().backward()
    assert abs(float(model.net.theta.grad)) > 1e-4
    with torch.no_grad():
        model.net.theta.fill_(0.2)
    model.net.theta.grad = None
    loss_fn.terms(model, _weight(), x0, z, t, step=10).loss.sum().backward()
    assert float(model.net.theta.grad) > 1e-4


def test_loss_draws_times_from_the_lognormal_proposal_and_warms_up() -> None:
    loss_fn = SCMLoss(JVPTangent(), P_mean=-1.0, P_std=1.4, warmup_steps=100, sigma_data=SD)
    torch.manual_seed(0)
    t = loss_fn.draw_times(20000, torch.device("cpu"))
    tau = torch.log(SD * torch.tan(t))  # tan t = e^tau / sd
    assert float(tau.mean()) == pytest.approx(-1.0, abs=0.05) and float(
        tau.std()
    ) == pytest.approx(1.4, abs=0.05)
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
    assert [loss_fn.warmup(k) for k in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    model = TrigFlowPrecond(tiny())
    out = loss_fn(model, AdaptiveWeight(16), torch.randn(4, 1, 8, 8).clamp(-1, 1))
    assert out.loss.shape == (4,) and torch.isfinite(out.loss).all()
    for bad, match in (
        ({"P_std": 0}, "model.loss.P_std must be > 0"),
        ({"warmup_steps": -1}, "model.loss.warmup_steps must be an integer >= 0"),
        ({"tangent_c": 0}, "model.loss.tangent_c must be > 0"),
        ({"tangent_norm": "max"}, "model.loss.tangent_norm must be one of rms, l2, got 'max'"),
    ):
        with pytest.raises(ValueError, match=match):
            SCMLoss(JVPTangent(), **bad)


@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_tangent_normalisation_divides_by_the_chosen_norm_plus_c(norm: str) -> None:
    """g <- g / (n + c) with n = ||g||_2 / sqrt(D) (rms: FastGen's g_norm_spatial_invariance)
    or n = ||g||_2 (l2). At the forward value F = F^-, so the loss is
    lambda e^w / D ||g / (n + c)||^2 - w: recover ||g / (n + c)||^2 from it and compare it with
    ||g||^2 / (n + c)^2, ||g||_2 taken from the l2 run (its reported norm is the plain one)."""
    torch.manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    z = SD * torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.3, 0.9, 1.3])
    model, weight = TrigFlowPrecond(tiny()), AdaptiveWeight(16)
    outs = {}
    for kind in ("l2", norm):
        loss_fn = SCMLoss(JVPTangent(), tangent_c=0.1, tangent_norm=kind, sigma_data=SD)
        outs[kind] = loss_fn.terms(model, weight, x0, z, t, step=10**6)
    out, l2 = outs[norm], outs["l2"].tangent_norm
    dim = 64
    n = l2 / math.sqrt(dim) if norm == "rms" else l2
    torch.testing.assert_close(out.tangent_norm, n)
    sq = (out.loss + out.w).detach() * dim * SD * torch.tan(t) / torch.exp(out.w)
    torch.testing.assert_close(sq, l2**2 / (n + 0.1) ** 2, rtol=1e-5, atol=1e-6)
    if norm == "rms":  # n << ||g||_2: the normalised tangent has RMS close to 1, not 1/sqrt(D)
        assert float((sq / dim).sqrt().min()) > 0.5


def test_sigma_interface_keeps_float64_sigmas_exact() -> None:
    """float64: a Python-float sigma gives the same f as the float64 tensor (built in float64,
    not rounded through float32 first), and sample_trigflow's times stay float64."""
    model = TrigFlowPrecond(GaussianTrigFlowNet()).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    for s in (0.002, 0.05, 0.9824, 80.0):
        tensor = torch.full((4,), s, dtype=torch.float64)
        assert torch.equal(model(x, s), model(x, tensor)), s
    want = x * S / math.sqrt(S**2 + 0.05**2)
    torch.testing.assert_close(model(x, 0.05), want, rtol=1e-13, atol=1e-13)
