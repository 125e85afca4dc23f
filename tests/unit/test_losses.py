"""CD / CT objectives and the EDM loss against closed forms on Gaussian data (no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmexp.diffusion import (
    CMPrecond,
    euler_step,
    gaussian_consistency_fn,
    gaussian_denoiser,
    heun_step,
    karras_sigmas,
)
from cmexp.methods.consistency.loss import (
    ConsistencyDistillationLoss,
    ConsistencyTrainingLoss,
    LognormalIndices,
    UniformIndices,
    replay_rng,
)
from cmexp.methods.edm.loss import EDMLoss
from cmexp.losses.distances import l2
from cmexp.losses.weighting import ICTWeighting, UniformWeighting
from cmexp.nets import TinyUNet

SD = 0.5
EXACT = gaussian_consistency_fn(SD)


class Scaled(nn.Module):
    """f(x, s) = a f*(x, s): exact at a = 1. (Any a keeps f consistent along ODE paths; only
    the boundary value is off, which the CD loss cannot see.)"""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        return EXACT(x, sigma) * self.a


def every_interval(reps: int):
    """Index sampler that visits every grid interval ``reps`` times: the expectation over
    j ~ U{0..N-2} becomes an exact average."""
    return lambda sigmas, b, device: torch.arange(
        len(sigmas) - 1, device=device
    ).repeat_interleave(reps)[:b]


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


@pytest.mark.parametrize(
    ("solver", "n", "tol"),
    [
        (heun_step, 18, 1e-4),
        (heun_step, 40, 1e-6),
        (heun_step, 200, 1e-9),
        (euler_step, 1000, 1e-9),
    ],
)
def test_cd_with_exact_teacher_and_exact_model_has_zero_loss_and_gradient(solver, n, tol) -> None:
    """Exact denoiser as teacher, exact consistency function as online and target model: the
    loss is the teacher solver's error only (relative to E d(f, 0) = sd^2), and d loss/d theta
    at the exact parameters vanishes."""
    torch.manual_seed(0)
    loss_fn = ConsistencyDistillationLoss(l2, solver, teacher=gaussian_denoiser(SD))
    sigmas = karras_sigmas(n, dtype=torch.float64)
    x = _images(2048)
    for exact, wrong, name in (
        (Perturbed(0.0), Perturbed(0.05), "b"),
        (Scaled(1.0), Perturbed(0.05), "a"),
    ):
        out = loss_fn(exact, exact, x, sigmas).loss
        ref = loss_fn(wrong, wrong, x, sigmas).loss
        assert out.shape == (2048,) and out.dtype == torch.float64
        assert out.mean().item() < tol * SD**2
        assert out.mean().item() < 1e-2 * ref.mean().item()
        out.mean().backward()
        ref.mean().backward()
        assert abs(getattr(exact, name).grad.item()) < 1e-3 * abs(wrong.b.grad.item())


def test_cd_euler_error_shrinks_like_dt4_for_a_consistent_model() -> None:
    """Exact model, Euler teacher: per-step error O(dt^2), loss O(dt^4), i.e. ~16x per doubling."""
    means = []
    for n in (200, 400):
        torch.manual_seed(0)
        reps = 8000 // (n - 1) + 1
        fn = ConsistencyDistillationLoss(
            l2, euler_step, teacher=gaussian_denoiser(SD), index_sampler=every_interval(reps)
        )
        grid = karras_sigmas(n, dtype=torch.float64)
        means.append(
            fn(Scaled(1.0), Scaled(1.0), _images(reps * (n - 1)), grid).loss.mean().item()
        )
    assert means[0] / means[1] == pytest.approx(16.0, rel=0.15)


def test_ct_and_cd_gradients_agree_for_small_steps_theorem_2() -> None:
    """Thm. 2: with Euler and the exact score, CT and CD have the same gradient up to o(dt)."""
    sigmas = torch.tensor([1.0, 0.99], dtype=torch.float64)
    first = lambda s, b, d: torch.zeros(b, dtype=torch.long, device=d)  # noqa: E731
    cd = ConsistencyDistillationLoss(
        l2, euler_step, teacher=gaussian_denoiser(SD), index_sampler=first
    )
    ct = ConsistencyTrainingLoss(l2, index_sampler=first)
    grads = {}
    for name, fn in (("cd", cd), ("ct", ct)):
        model = Perturbed(0.3)
        torch.manual_seed(1)  # same x_t and z for both
        fn(model, model, _images(200_000, seed=2), sigmas).loss.mean().backward()
        grads[name] = model.b.grad.item()
    assert grads["cd"] != 0
    assert grads["ct"] == pytest.approx(grads["cd"], rel=0.05)


def _closed_form_losses(sigmas: torch.Tensor, b: float) -> tuple[float, float]:
    """Exact E[L_CD] (Euler, exact score) and E[L_CT] for the model f*(x, s)(1 + b s) with
    d = l2, lambda = 1, j uniform over the grid intervals. With a(s) = sqrt((sd^2+eps^2)/(sd^2+s^2))
    and x_t ~ N(0, sd^2 + t^2):
    CD: f(x_t, t) - f(x_hat, t') = c x_t, c = a(t)(1+bt) - a(t')(1+bt')(1 - dt t/(sd^2+t^2));
    CT adds the variance of f(., t') over x given x_t, (a(t')(1+bt') dt/t)^2 sd^2 t^2/(sd^2+t^2)
    (the cross term vanishes because E[x - D(x_t) | x_t] = 0)."""
    eps = 0.002
    t, t_next = sigmas[:-1], sigmas[1:]
    dt = t - t_next
    a = lambda u: ((SD**2 + eps**2) / (SD**2 + u**2)).sqrt()  # noqa: E731
    c = a(t) * (1 + b * t) - a(t_next) * (1 + b * t_next) * (1 - dt * t / (SD**2 + t**2))
    cd = c**2 * (SD**2 + t**2)
    var = (a(t_next) * (1 + b * t_next) * dt / t) ** 2 * SD**2 * t**2 / (SD**2 + t**2)
    return cd.mean().item(), (cd + var).mean().item()


@pytest.mark.parametrize(("n", "b"), [(1000, 0.3), (2000, 0.3), (1000, 0.05)])
def test_ct_and_cd_expected_losses_and_gradients_theorem_2(n, b) -> None:
    """Thm. 2 over the whole grid: Euler teacher with the exact score vs CT, same inconsistent
    model f*(x, s)(1 + b s), expectation over every interval j (fixed seeds, same x and z for
    both). Both Monte-Carlo losses match their closed forms; the gradients agree (here even
    exactly in expectation). The losses differ by a theta-independent variance term of the
    same order dt^2 as the loss itself: 0.5% for b = 0.3 (loss dominated by large sigma), 13%
    for b = 0.05 -- the agreement Thm. 2 promises is of the gradients, not the loss values."""
    sigmas = karras_sigmas(n, dtype=torch.float64)
    reps = 40_000 // (n - 1) + 1
    res = {}
    for name in ("cd", "ct"):
        kw = dict(index_sampler=every_interval(reps))
        fn = (
            ConsistencyDistillationLoss(l2, euler_step, teacher=gaussian_denoiser(SD), **kw)
            if name == "cd"
            else ConsistencyTrainingLoss(l2, **kw)
        )
        model = Perturbed(b)
        torch.manual_seed(1)
        loss = fn(model, model, _images(reps * (n - 1), seed=2), sigmas).loss.mean()
        loss.backward()
        res[name] = (loss.item(), model.b.grad.item())
    cd_exact, ct_exact = _closed_form_losses(sigmas, b)
    assert res["cd"][0] == pytest.approx(cd_exact, rel=0.03)
    assert res["ct"][0] == pytest.approx(ct_exact, rel=0.03)
    assert res["ct"][1] == pytest.approx(res["cd"][1], rel=1e-3)
    if b == 0.3:
        assert ct_exact == pytest.approx(cd_exact, rel=0.01)
        assert res["ct"][0] == pytest.approx(res["cd"][0], rel=0.03)
    else:
        assert ct_exact / cd_exact == pytest.approx(1.13, abs=0.01)
    # both scale like dt^2 ~ 1/(N-1)^2: (N-1)^2 L is the same for every large N
    ref_cd, ref_ct = _closed_form_losses(karras_sigmas(4000, dtype=torch.float64), b)
    assert cd_exact * (n - 1) ** 2 == pytest.approx(ref_cd * 3999**2, rel=1e-3)
    assert ct_exact * (n - 1) ** 2 == pytest.approx(ref_ct * 3999**2, rel=1e-3)


def test_ct_and_cd_loss_both_scale_like_dt_squared() -> None:
    sigmas = {n: karras_sigmas(n, dtype=torch.float64) for n in (250, 500, 1000)}
    for make in (
        lambda kw: ConsistencyTrainingLoss(l2, **kw),
        lambda kw: ConsistencyDistillationLoss(
            l2, euler_step, teacher=gaussian_denoiser(SD), **kw
        ),
    ):
        losses = []
        for n, grid in sigmas.items():
            reps = 20_000 // (n - 1) + 1
            torch.manual_seed(5)
            fn = make(dict(index_sampler=every_interval(reps)))
            x = _images(reps * (n - 1), seed=6)
            losses.append(fn(Perturbed(0.3), Perturbed(0.3), x, grid).loss.mean().item())
        for (n0, n1), (l0, l1) in zip([(250, 500), (500, 1000)], zip(losses, losses[1:])):
            assert l0 / l1 == pytest.approx(((n1 - 1) / (n0 - 1)) ** 2, rel=0.05)


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
    (x_hat, s_next), (x_t, s) = model.calls  # the target pass runs first (fewer page faults)
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
    x = _images(16).float()
    assert not torch.equal(model(x, 1.0), model(x, 1.0))  # masks differ without the replay
    out = ConsistencyTrainingLoss(l2)(model, model, x, karras_sigmas(10))
    assert torch.equal(out.loss, torch.zeros(16))
    cd = ConsistencyDistillationLoss(l2, heun_step, teacher=gaussian_denoiser(SD))
    assert torch.equal(cd(model, model, x, karras_sigmas(10)).loss, torch.zeros(16))
    # two copies with equal weights (online vs target network) behave the same way
    twin = DropoutFn().train()
    assert torch.equal(
        ConsistencyTrainingLoss(l2)(model, twin, x, karras_sigmas(10)).loss, torch.zeros(16)
    )


def test_replay_rng_replays_and_leaves_the_stream_untouched() -> None:
    torch.manual_seed(0)
    with replay_rng(torch.device("cpu")) as replay:
        a = torch.rand(5)
        with replay():
            b = torch.rand(5)
        after = torch.rand(5)
    torch.manual_seed(0)
    torch.rand(5)
    assert torch.equal(a, b)
    assert torch.equal(after, torch.rand(5))  # the replay did not consume the global stream


def test_edm_loss_of_the_exact_denoiser_is_one_on_average() -> None:
    torch.manual_seed(0)
    loss = EDMLoss()(gaussian_denoiser(SD), _images(20_000))
    assert loss.shape == (20_000,)
    # per-dim error variance sd^2 s^2/(sd^2+s^2) times weight (s^2+sd^2)/(s sd)^2 = 1
    assert loss.mean().item() == pytest.approx(1.0, rel=0.03)
    # the weight (s^2 + sd^2)/(s sd)^2 on a known error: D(x) = x leaves the noise s n, so the
    # loss is (s^2 + sd^2)/sd^2 mean(n^2), 5 at s = 1 (P_mean = 0, tiny P_std)
    ident = EDMLoss(P_mean=0.0, P_std=1e-6)(lambda x, s, c=None: x, _images(20_000))
    assert ident.mean().item() == pytest.approx(5.0, rel=0.02)
    with pytest.raises(ValueError, match="P_std"):
        EDMLoss(P_std=0.0)


def test_weightings_and_index_samplers() -> None:
    s, s_next = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.5])
    assert torch.equal(UniformWeighting()(s, s_next), torch.ones(2))
    torch.testing.assert_close(ICTWeighting()(s, s_next), torch.tensor([2.0, 2.0]))
    grid = karras_sigmas(18, dtype=torch.float64)
    torch.testing.assert_close(ICTWeighting()(grid[:-1], grid[1:]), 1 / (grid[:-1] - grid[1:]))
    assert UniformWeighting()(grid[:-1], grid[1:]).dtype == torch.float64
    sigmas = karras_sigmas(18)
    for sampler in (UniformIndices(), LognormalIndices()):
        idx = sampler(sigmas, 5000, torch.device("cpu"))
        assert idx.dtype == torch.long and idx.shape == (5000,)
        assert idx.min() >= 0 and idx.max() <= 16
    idx = UniformIndices()(sigmas, 5000, torch.device("cpu"))
    assert set(idx.tolist()) == set(range(17))  # every interval j = 0..N-2, uniformly
    assert torch.bincount(idx).float().std().item() < 0.15 * 5000 / 17
    ln = LognormalIndices()(karras_sigmas(200), 20000, torch.device("cpu"))
    mid = karras_sigmas(200)[ln].log().median().item()
    assert mid == pytest.approx(-1.1, abs=0.3)  # iCT: lognormal around P_mean = -1.1


def test_cd_end_to_end_with_a_conditional_net_only_the_online_net_gets_gradients() -> None:
    torch.manual_seed(0)
    online = CMPrecond(TinyUNet(8, 1, label_dim=3))
    target = CMPrecond(TinyUNet(8, 1, label_dim=3))  # requires_grad stays True: no_grad must hold
    teacher = gaussian_denoiser(SD)
    x = torch.randn(4, 1, 8, 8) * SD
    labels = torch.tensor([0, 1, 2, 3])  # 3 = null label
    out = ConsistencyDistillationLoss(l2, heun_step, teacher=teacher)(
        online, target, x, karras_sigmas(18), labels
    )
    out.loss.mean().backward()
    assert out.loss.shape == (4,)
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert out.sigma.shape == (4,) and bool((out.sigma > out.sigma_next).all())
    # labels reach the online net: other labels, other loss (same seeds)
    torch.manual_seed(1)
    fn = ConsistencyDistillationLoss(l2, heun_step, teacher=teacher)
    a = fn(online, target, x, karras_sigmas(18), labels).loss
    torch.manual_seed(1)
    b = fn(online, target, x, karras_sigmas(18), None).loss
    assert not torch.equal(a, b)
    # CT end to end as well; a missing teacher is reported
    ConsistencyTrainingLoss(l2)(
        online, target, x, karras_sigmas(18), labels
    ).loss.mean().backward()
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyDistillationLoss(l2, heun_step)(online, target, x, karras_sigmas(18))
