"""MeanFlow (Geng et al. 2025) against closed forms: the exact average velocity of Gaussian data
gives zero loss and zero gradient (and the one-step sampler maps noise to the data exactly),
the JVP target against finite differences and against ``du/dt = (v - u) / (t - r)``, the
paper's (r, t) sampler against its distribution functions, the adaptive weighting, the
classifier-free-guidance target, the sigma <-> t plans, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cmexp.diffusion.vp import VPSchedule
from cmexp.inference.plan import SamplingSpec, sigma_plan
from cmexp.losses.tangent import JVP, FiniteDifference
from cmexp.methods.meanflow.loss import (
    MeanFlowGuidance,
    MeanFlowLoss,
    TimePairSampler,
    check_meanflow_tangent,
)
from cmexp.methods.meanflow.precond import (
    MeanFlowPrecond,
    flow_map_times,
    linear_path_alpha_bars,
    sigma_to_t,
    t_to_sigma,
)
from cmexp.methods.meanflow.sampler import run
from cmexp.nets import TinyUNet

S = 0.8  # std of the Gaussian data (!= 1, so the flow is not straight)


def var(t: Tensor) -> Tensor:
    """``Var z_t = (1 - t)^2 S^2 + t^2`` per coordinate."""
    return (1 - t) ** 2 * S**2 + t**2


def exact_u(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """The exact average velocity of data N(0, S^2 I): the flow is ``z_r = sqrt(var_r / var_t)
    z_t``, so ``u = z (1 - sqrt(var_r / var_t)) / (t - r)``, written without the 0/0 at r = t
    (``var_t - var_r = (t - r)((t + r) - S^2 (2 - t - r))``); r = t is the velocity
    ``v = z (t - S^2 (1 - t)) / var_t``."""
    t4, r4 = t[:, None, None, None], r[:, None, None, None]
    vt, vr = var(t4), var(r4)
    return z * ((t4 + r4) - S**2 * (2 - t4 - r4)) / (vt * (1 + torch.sqrt(vr / vt)))


class GaussianMeanFlowNet(nn.Module):
    """Raw net whose MeanFlowPrecond is ``(1 + theta)`` times the exact average velocity
    (theta = 0: exact). It reads t from the noise label and t - r from the guidance input."""

    img_resolution, img_channels, label_dim = 4, 1, 0
    guidance_embed = True

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, guidance=None
    ) -> Tensor:
        t = noise_labels.to(x.dtype)
        r = t - guidance.to(x.dtype)
        return (1 + self.theta) * exact_u(x, r, t)


def gaussian_model() -> MeanFlowPrecond:
    return MeanFlowPrecond(GaussianMeanFlowNet()).double()


def tiny(channels: int = 1, dropout: float = 0.0, label_dim: int = 0) -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(
        img_resolution=8,
        img_channels=channels,
        model_channels=8,
        dropout=dropout,
        label_dim=label_dim,
        guidance_embed=True,
    )


def _times(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    b = torch.rand(n, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r[: n // 4] = t[: n // 4]  # a quarter with r = t (flow matching)
    return t, r


# ------------------------------------------------------------------ the path in sigma
def test_sigma_and_time_roundtrip_and_the_jump_grid() -> None:
    assert sigma_to_t(math.inf) == 1.0 and t_to_sigma(1.0) == math.inf
    assert sigma_to_t(1.0) == 0.5 and t_to_sigma(0.25) == pytest.approx(1 / 3)
    for t in (0.001, 0.3, 0.9):
        assert sigma_to_t(t_to_sigma(t)) == pytest.approx(t, rel=1e-12)
    # alpha_bar = 1 / (1 + sigma^2): the VP reading of z_t / (1 - t) = x + sigma e
    ab = linear_path_alpha_bars(10)
    sig = VPSchedule(ab).sigmas
    want = torch.tensor([i / 10 / (1 - i / 10) for i in range(1, 10)], dtype=torch.float64)
    torch.testing.assert_close(sig[:-1], want)
    assert math.isinf(float(sig[-1])) and ab[-1] == 0.0
    spec = SamplingSpec(
        family="flow_map",
        sampler="meanflow",
        sigma_min=1e-3,
        sigma_max=math.inf,
        num_scales=1000,
        taus=(1.0,),
        alpha_bars=linear_path_alpha_bars(1000),
    )
    assert sigma_plan(spec, 1) == [math.inf]
    assert sigma_plan(spec, 2) == [math.inf, 1.0]  # the paper's 1 -> 0.5 -> 0
    # steps=4 without taus: the trailing grid, uniform in t
    times = [sigma_to_t(s) for s in sigma_plan(spec, 4, taus=None, tau_indices=[250, 500, 750])]
    assert times == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-12)
    spec2 = SamplingSpec(**{**spec.__dict__, "taus": ()})
    assert [sigma_to_t(s) for s in sigma_plan(spec2, 4)] == pytest.approx(
        [1.0, 0.75, 0.5, 0.25], abs=1e-12
    )


def test_flow_map_times_refuse_r_above_t() -> None:
    assert flow_map_times([math.inf, 1.0]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"jumps from t=0.333333 to r=0.666667"):
        flow_map_times([math.inf, 0.5, 2.0])
    with pytest.raises(ValueError, match="noise levels in"):
        flow_map_times([math.inf, 0.0])


# ------------------------------------------------------------------ the wrapper
def test_wrapper_feeds_t_and_t_minus_r_and_needs_a_second_time_input() -> None:
    seen = {}

    class Recorder(nn.Module):
        img_resolution, img_channels, label_dim, guidance_embed = 4, 1, 0, True

        def forward(self, x, noise_labels, class_labels=None, guidance=None):
            seen["t"], seen["h"] = noise_labels, guidance
            return x

    m = MeanFlowPrecond(Recorder(), c_noise_scale=2.0)
    z = torch.zeros(2, 1, 4, 4)
    m.u(z, torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(seen["t"], torch.tensor([1.0, 1.8]))  # c t
    torch.testing.assert_close(seen["h"], torch.tensor([0.8, 1.4]))  # c (t - r)
    assert m.describe() == {"name": "meanflow"} and math.isinf(m.sigma_max)
    meta = {"sigma_min": 0.01, "sigma_data": 0.5, "c_noise_scale": 2.0}
    again = MeanFlowPrecond.from_meta(Recorder(), meta)
    assert (again.sigma_min, again.c_noise_scale) == (0.01, 2.0)
    with pytest.raises(ValueError, match="set net.guidance_embed=true"):
        MeanFlowPrecond(TinyUNet(img_resolution=8, img_channels=1))
    # a real net starts as the instantaneous-velocity net: the t - r embedding is zero at init
    net = MeanFlowPrecond(tiny()).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(net.u(x, 0.1, 0.9), net.u(x, 0.9, 0.9))


def test_the_flow_map_convention_in_sigma_is_the_jump_in_t() -> None:
    """``model(x_sigma, sigma, labels, sigma_next)`` (the flow_map family's convention, shared
    with IMM) is ``z_r = z_t - (t - r) u`` with ``z_t = x_sigma / (1 + sigma)``, returned as
    ``z_r (1 + sigma_next)``; at sigma = inf the state is z_1 itself; sigma_next None is 0."""
    model = gaussian_model()
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t, r = (
        torch.tensor([0.8, 0.6, 0.3], dtype=torch.float64),
        torch.tensor([0.5, 0.0, 0.1], dtype=torch.float64),
    )
    sig_t, sig_r = t / (1 - t), r / (1 - r)
    x = z * (1 + sig_t)[:, None, None, None]  # x_sigma of z_t
    want = (z - (t - r)[:, None, None, None] * exact_u(z, r, t)) / (1 - r)[:, None, None, None]
    torch.testing.assert_close(model(x, sig_t, None, sigma_next=sig_r), want)
    one = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(model(z, math.inf), z - exact_u(z, 0 * one, one))  # e - u(e, 0, 1)
    torch.testing.assert_close(model(z, math.inf, sigma_next=math.inf), z)  # identity at t = r
    with pytest.raises(ValueError, match="sigma_next > sigma"):
        model(x, sig_t, sigma_next=sig_t + 1)


# ------------------------------------------------------------------ the target, closed form
def _batch(n: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    x = S * torch.randn(n, 1, 4, 4, dtype=torch.float64)
    e = torch.randn_like(x)
    t, r = _times(n)
    return x, e, t, r


def _marginal_velocity(x: Tensor, e: Tensor, t: Tensor) -> Tensor:
    t4 = t[:, None, None, None]
    z = (1 - t4) * x + t4 * e
    return exact_u(z, t, t)


def test_jvp_target_equals_finite_differences_and_the_identity() -> None:
    """d/dt u along (v, 1) at fixed r: the JVP, a central difference, and, for the exact model
    with the exact velocity, the identity's ``(v - u) / (t - r)``."""
    model = gaussian_model()
    x, e, t, r = _batch()
    t4 = t[:, None, None, None]
    z = (1 - t4) * x + t4 * e
    v = exact_u(z, t, t)

    def fn(zz: Tensor, tt: Tensor) -> Tensor:
        return model.u(zz, r, tt)

    jvp = JVP().derivative(fn, (z, t), (v, torch.ones_like(t)))
    fd = FiniteDifference(1e-4).derivative(fn, (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(jvp, fd, atol=1e-7, rtol=1e-6)
    gap = (t - r)[:, None, None, None]
    moving = t > r
    ident = (v - model.u(z, r, t)) / gap
    torch.testing.assert_close(jvp[moving], ident[moving], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    ("tangent", "tol"), [(JVP(), 1e-10), (FiniteDifference(1e-4), 1e-4)]
)  # finite differences: their O(eps^2) error, times the adaptive weight (1e-3)^-0.75 = 178
def test_exact_average_velocity_gives_zero_loss_and_zero_gradient(tangent, tol: float) -> None:
    """With the exact instantaneous velocity v(z_t, t), the exact u satisfies the MeanFlow
    identity: u_tgt = u for every sample (r = t included), so loss and gradient vanish."""
    model = gaussian_model()
    loss_fn = MeanFlowLoss(tangent, norm_p=0.75, norm_eps=1e-3)
    x, e, t, r = _batch()
    v = _marginal_velocity(x, e, t)
    out = loss_fn.terms(model, x, e, t, r, velocity=v)
    assert float(out.error.max()) < tol**2
    out.loss.sum().backward()
    assert abs(float(model.net.theta.grad)) < tol
    # a wrong model: u_theta - u_tgt = theta v (the target moves with the model, stop-gradient),
    # so the error is theta^2 ||v||^2 and the gradient pushes theta back to 0
    with torch.no_grad():
        model.net.theta.fill_(0.2)
    model.net.theta.grad = None
    bad = loss_fn.terms(model, x, e, t, r, velocity=v)
    torch.testing.assert_close(
        bad.error, 0.04 * (v**2).flatten(1).sum(1), atol=1e-6 if tol > 1e-9 else 1e-12, rtol=1e-6
    )
    bad.loss.sum().backward()
    assert float(model.net.theta.grad) > 1e-3


def _antithetic_batch(n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pairs (x = m +- d, e) with the same z_t = (1 - t) x + t e, where m = E[x | z_t]: their
    conditional velocities e - x = v(z_t) -+ d / t average to the exact velocity."""
    torch.manual_seed(1)
    t, r = _times(n, seed=1)
    t4 = t[:, None, None, None]
    z = var(t4).sqrt() * torch.randn(n, 1, 4, 4, dtype=torch.float64)
    m = (1 - t4) * S**2 / var(t4) * z
    d = 0.3 * torch.randn_like(z)
    x = torch.cat([m + d, m - d])
    t2, r2 = t.repeat(2), r.repeat(2)
    e = (z.repeat(2, 1, 1, 1) - (1 - t2[:, None, None, None]) * x) / t2[:, None, None, None]
    return x, e, t2, r2


def test_conditional_velocities_average_to_a_zero_gradient_at_the_exact_u() -> None:
    """MeanFlow trains with the one-sample velocity e - x. Over antithetic pairs with the same
    z_t its target deviations are opposite and of equal norm (equal adaptive weights), so the
    gradient of the exact u is zero although each loss is not; a wrong model gets a gradient."""
    model = gaussian_model()
    loss_fn = MeanFlowLoss(JVP(), norm_p=0.75)
    x, e, t, r = _antithetic_batch(8)
    out = loss_fn.terms(model, x, e, t, r)
    assert float(out.error.min()) > 1e-3  # no sample's target is the exact u
    torch.testing.assert_close(out.weight[:8], out.weight[8:])
    out.loss.sum().backward()
    assert abs(float(model.net.theta.grad)) < 1e-9
    with torch.no_grad():
        model.net.theta.fill_(0.2)
    model.net.theta.grad = None
    loss_fn.terms(model, x, e, t, r).loss.sum().backward()
    assert abs(float(model.net.theta.grad)) > 1e-3


def test_adaptive_weighting_is_a_stop_gradient_weight() -> None:
    """loss = sg(w) ||Delta||^2 with w = 1 / (||Delta||^2 + c)^p; p = 0 is the plain squared l2
    loss (summed over pixels)."""
    x, e, t, r = _batch(8)
    v = _marginal_velocity(x, e, t)
    grads = {}
    for p in (0.0, 0.75, 1.0):
        model = gaussian_model()
        with torch.no_grad():
            model.net.theta.fill_(0.3)
        out = MeanFlowLoss(JVP(), norm_p=p, norm_eps=1e-3).terms(model, x, e, t, r, velocity=v)
        torch.testing.assert_close(out.weight, (out.error + 1e-3) ** (-p))
        torch.testing.assert_close(out.loss, out.error * out.weight)
        out.loss.sum().backward()
        grads[p] = float(model.net.theta.grad)
        # d/dtheta of w ||Delta||^2 with w constant: Delta = theta v, u = (1 + theta) u*
        u_star = exact_u((1 - t[:, None, None, None]) * x + t[:, None, None, None] * e, r, t)
        delta = 0.3 * v
        want = (out.weight * 2 * (delta * u_star).flatten(1).sum(1)).sum()
        assert grads[p] == pytest.approx(float(want), rel=1e-9)


def test_r_above_t_and_guidance_without_labels_are_refused() -> None:
    model = gaussian_model()
    x, e, t, r = _batch(4)
    with pytest.raises(ValueError, match=r"every r must be <= t, got r > t for 4 of 4"):
        MeanFlowLoss(JVP()).terms(model, x, e, r - 0.01, t)
    with pytest.raises(ValueError, match="needs class labels"):
        MeanFlowLoss(JVP(), guidance=MeanFlowGuidance(omega=2.0)).terms(model, x, e, t, r)


# ------------------------------------------------------------------ the (r, t) sampler
def _phi(a: float, mean: float, std: float) -> float:
    """P(sigmoid(N(mean, std^2)) <= a)."""
    return 0.5 * (1 + math.erf((math.log(a / (1 - a)) - mean) / (std * math.sqrt(2))))


def test_time_pair_sampler_v0_is_the_papers() -> None:
    """v0: t = max and r = min of two logit-normals, then r = t with probability 1 - ratio:
    P(t <= a) = Phi(a)^2, and for r != t, P(r <= a) = 1 - (1 - Phi(a))^2."""
    torch.manual_seed(0)
    tr = TimePairSampler(-2.0, 2.0, ratio=0.75)(200_000)
    t, r = tr[:, 0].double(), tr[:, 1].double()
    assert bool((r <= t).all()) and bool(((t >= 0) & (t <= 1)).all())
    moved = r < t
    assert float(moved.double().mean()) == pytest.approx(0.75, abs=0.005)
    for a in (0.02, 0.1, 0.3, 0.6):
        assert float((t <= a).double().mean()) == pytest.approx(_phi(a, -2, 2) ** 2, abs=0.005)
        assert float((r[moved] <= a).double().mean()) == pytest.approx(
            1 - (1 - _phi(a, -2, 2)) ** 2, abs=0.005
        )


def test_time_pair_sampler_v1_is_py_meanflows() -> None:
    """v1 (py-meanflow's improved recipe): t ~ lognorm(-0.6, 1.6); r = t with probability
    1 - ratio, else min(t, r'), r' ~ lognorm(-4.0, 1.6)."""
    torch.manual_seed(0)
    tr = TimePairSampler(-0.6, 1.6, -4.0, 1.6, ratio=0.75, version="v1")(200_000)
    t, r = tr[:, 0].double(), tr[:, 1].double()
    assert bool((r <= t).all())
    for a in (0.1, 0.35, 0.7):
        assert float((t <= a).double().mean()) == pytest.approx(_phi(a, -0.6, 1.6), abs=0.005)
    # r != t needs the 75% draw and r' < t: logit r' - logit t ~ N(-3.4, 2 x 1.6^2)
    want = 0.75 * 0.5 * (1 + math.erf(3.4 / (1.6 * math.sqrt(2)) / math.sqrt(2)))
    assert float((r < t).double().mean()) == pytest.approx(want, abs=0.005)
    with pytest.raises(ValueError, match="model.loss.times.ratio must be in"):
        TimePairSampler(ratio=1.5)
    with pytest.raises(ValueError, match="model.loss.times.version must be v0 or v1"):
        TimePairSampler(version="v2")


def test_draws_are_made_for_the_global_batch() -> None:
    """Two ranks of 4 draw the halves of what one process with 8 draws (times and noise)."""
    model = MeanFlowPrecond(tiny())
    loss_fn = MeanFlowLoss(JVP())
    images = torch.zeros(8, 1, 8, 8)
    torch.manual_seed(3)
    full = loss_fn(model, images)
    parts = []
    for rank in (0, 1):
        torch.manual_seed(3)
        parts.append(loss_fn(model, images[:4], shard=(rank, 2)))
    torch.testing.assert_close(torch.cat([p.t for p in parts]), full.t)
    torch.testing.assert_close(torch.cat([p.r for p in parts]), full.r)
    torch.testing.assert_close(
        torch.cat([p.error for p in parts]), full.error, rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------ guidance in the target
class LabelLinearNet(nn.Module):
    """``u(z, r, t | c) = a_c z`` with ``a_c = 0.5 + 0.1 c`` (the null label c = label_dim):
    d/dt u along (v~, 1) is ``a_c v~``, so the target is ``v~ (1 - (t - r) a_c)``."""

    img_resolution, img_channels, label_dim, guidance_embed = 4, 1, 3, True

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, noise_labels, class_labels=None, guidance=None):
        a = 0.5 + 0.1 * class_labels.to(x.dtype)
        return self.scale * a[:, None, None, None] * x


def test_guidance_is_folded_into_the_target() -> None:
    """v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) inside
    [t_start, t_end] (v outside and for dropped labels, which get the null label); the target
    and the JVP's tangent both use v~."""
    model = MeanFlowPrecond(LabelLinearNet()).double()
    guide = MeanFlowGuidance(omega=2.0, kappa=0.5, t_start=0.2, t_end=0.8)
    loss_fn = MeanFlowLoss(JVP(), norm_p=0.0, guidance=guide, label_dropout=0.25)
    x, e, t, r = _batch(8)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.4, 0.6, 0.5], dtype=torch.float64)
    r = t * 0.5
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    keep = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.9, 0.2])  # the last one and #5 dropped
    out = loss_fn.terms(model, x, e, t, r, labels, keep)
    t4, r4 = t[:, None, None, None], r[:, None, None, None]
    z = (1 - t4) * x + t4 * e
    v = e - x
    dropped = keep < 0.25
    a = lambda c: (0.5 + 0.1 * c.double())[:, None, None, None]  # noqa: E731
    null = torch.full_like(labels, 3)
    guided = 2.0 * v + 0.5 * a(labels) * z + (1 - 2.0 - 0.5) * a(null) * z
    inside = ((t >= 0.2) & (t <= 0.8) & ~dropped)[:, None, None, None]
    vg = torch.where(inside, guided, v)
    used = torch.where(dropped, null, labels)
    target = vg * (1 - (t4 - r4) * a(used))
    want = ((a(used) * z - target) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(out.error, want)
    assert guide.effective_scale == 4.0 and guide.active
    assert not MeanFlowGuidance().active
    with pytest.raises(ValueError, match="kappa must be in"):
        MeanFlowGuidance(kappa=1.0)
    with pytest.raises(ValueError, match="t_start <= t_end"):
        MeanFlowGuidance(t_start=0.6, t_end=0.5)


def test_guidance_passes_run_without_dropout_and_restore_the_mode() -> None:
    net = tiny(label_dim=3, dropout=0.5)
    model = MeanFlowPrecond(net).train()
    loss_fn = MeanFlowLoss(JVP(), guidance=MeanFlowGuidance(omega=1.5))
    modes = []
    hook = net.conv_out.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    x = torch.randn(4, 1, 8, 8)
    loss_fn(model, x, torch.tensor([0, 1, 2, 0]))
    hook.remove()
    assert modes[0] is False and modes[-1] is True  # the guidance pass, then the online pass
    assert model.training and net.training


# ------------------------------------------------------------------ sampling
def test_one_step_and_multistep_jumps_of_the_exact_map_give_the_data() -> None:
    """x = e - u(e, 0, 1) = S e exactly (N(0, I) -> N(0, S^2 I)); flow-map jumps through
    t = 0.5 and 0.2 compose to the same map."""
    model = gaussian_model()
    e = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    one = run(model, e, [math.inf], sigma_min=1e-3, clip=False)
    torch.testing.assert_close(one, S * e)
    three = run(model, e, [math.inf, 1.0, 0.25], sigma_min=1e-3, clip=False)
    torch.testing.assert_close(three, S * e)
    torch.testing.assert_close(
        run(model, 3 * e, [math.inf], sigma_min=1e-3, clip=True), (3 * S * e).clamp(-1, 1)
    )
    with pytest.raises(ValueError, match="strictly descending taus"):
        run(model, e, [math.inf, 0.5, 2.0], sigma_min=1e-3)


def test_the_registry_knows_the_flow_map_family() -> None:
    from cmexp import registry
    from cmexp.inference.plan import check_sampler, nfe

    method = registry.method("meanflow")
    assert (method.family, method.sampler) == ("flow_map", "meanflow")
    # the family IMM registered: its pushforward samplers start from sigma_max z
    assert set(registry.samplers("flow_map")) == {"meanflow", "pushforward", "pushforward_restart"}
    assert nfe([math.inf, 1.0], "meanflow") == 2
    spec = SamplingSpec(family="flow_map", sampler="meanflow", sigma_max=math.inf)
    assert not spec.uses_solver and check_sampler(None, spec) == "meanflow"
    with pytest.raises(ValueError, match="sampler=consistency does not fit a flow_map model"):
        check_sampler("consistency", spec)
    with pytest.raises(ValueError, match="sampler=meanflow does not fit a consistency model"):
        check_sampler("meanflow", SamplingSpec(family="consistency", sampler="consistency"))
    with pytest.raises(
        ValueError,
        match=r"sampler=pushforward cannot start at sigma_max = inf .*; use one of meanflow",
    ):
        check_sampler("pushforward", spec)
    imm = SamplingSpec(family="flow_map", sampler="pushforward", sigma_max=82.8)
    assert check_sampler("meanflow", imm) == "meanflow"  # a finite flow map takes it too


# ------------------------------------------------------------------ forward-mode AD
def test_a_layer_without_forward_mode_ad_is_named() -> None:
    from tests.fakes import NoForwardADTinyUNet

    model = MeanFlowPrecond(
        NoForwardADTinyUNet(img_resolution=8, img_channels=1, guidance_embed=True)
    )
    with pytest.raises(
        ValueError,
        match=r"tangent=jvp: layer 'net.quant' \(Quantize\) of the network does not support forward-mode AD",
    ):
        check_meanflow_tangent(JVP(), model)
    check_meanflow_tangent(FiniteDifference(), model)  # the fallback needs nothing
    good = MeanFlowPrecond(tiny())  # TinyUNet supports it
    state = torch.get_rng_state()
    check_meanflow_tangent(JVP(), good)
    assert torch.equal(state, torch.get_rng_state())  # the probe leaves the global RNG alone


def test_jvp_and_finite_difference_agree_on_a_real_net_with_dropout() -> None:
    """The tangent pass and the online pass share dropout masks (replay_rng): the JVP and the
    central difference of a TinyUNet with dropout 0.2 agree, and so do their losses."""
    model = MeanFlowPrecond(tiny(dropout=0.2)).train()
    with torch.no_grad():  # a non-zero t - r embedding, so d/dt sees both times
        model.net.guidance_embed.proj.weight.normal_(0, 0.1)
    torch.manual_seed(2)
    x = torch.randn(4, 1, 8, 8)
    out = {}
    for name, tangent in (("jvp", JVP()), ("fd", FiniteDifference(1e-3))):
        torch.manual_seed(5)
        out[name] = MeanFlowLoss(tangent)(model, x)
    torch.testing.assert_close(out["jvp"].t, out["fd"].t)
    assert float(((out["jvp"].error - out["fd"].error) / out["jvp"].error).abs().max()) < 1e-2
