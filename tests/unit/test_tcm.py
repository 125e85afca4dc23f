"""TCM stage 2 (truncated consistency models): the truncated time law, the gap, the split
consistency function and its boundary condition in closed form, the batch weights, the rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from cmexp.diffusion.precond import gaussian_consistency_fn
from cmexp.methods.tcm.loss import TCMLoss, split_function
from cmexp.methods.tcm.rules import rules
from cmexp.utils.checks import ConfigError

CPU = torch.device("cpu")


def test_truncated_student_t_law_matches_tcm_sampler() -> None:
    """ln t ~ Student-t(0, 0.2, df 0.01) on [ln 1, ln 80] (NVlabs/TCM misc.truncated_t): the
    inverse-CDF map of u is exact at the ends and its quantiles are scipy's truncated law."""
    from scipy import stats

    loss = TCMLoss(P_mean=0.0, P_std=0.2, df=0.01, transition_t=1.0, sigma_max=80.0)
    t = loss.t_from_uniform(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(t, torch.tensor([1.0, 80.0]))
    torch.manual_seed(0)
    draws = loss.sample_t(20_000, CPU).double()
    assert float(draws.min()) >= 1.0 and float(draws.max()) <= 80.0
    a, b = stats.t.cdf(0.0, 0.01), stats.t.cdf(math.log(80) / 0.2, 0.01)
    for q in (0.1, 0.5, 0.9):
        want = math.exp(0.2 * stats.t.ppf(a + q * (b - a), 0.01))
        assert float((draws <= want).double().mean()) == pytest.approx(q, abs=0.01)
    # the heavy tail: about a tenth of the levels above 10 (0.9-quantile ~ 10.4)
    assert 0.07 < float((draws > 10).double().mean()) < 0.13


def test_truncated_normal_law() -> None:
    loss = TCMLoss(time_dist="normal", P_mean=0.5, P_std=1.0, transition_t=0.5, sigma_max=80.0)
    torch.manual_seed(1)
    t = loss.sample_t(50_000, CPU).double()
    assert float(t.min()) >= 0.5 and float(t.max()) <= 80.0
    from scipy import stats

    lo, hi = math.log(0.5) - 0.5, math.log(80) - 0.5
    mean = stats.truncnorm.mean(lo, hi, loc=0.5, scale=1.0)
    assert float(t.log().mean()) == pytest.approx(mean, abs=0.02)


def test_gap_and_ratio_limit() -> None:
    loss = TCMLoss(q=2.0, k=8.0, b=1.0, ratio_limit=0.999)
    assert loss.ratio(0) == 0.5 and loss.ratio(8) == 1 - 2**-9
    assert loss.ratio(9) == 0.999 and loss.ratio(30) == 0.999  # 1 - 2^-10 > 0.999: clipped
    t = torch.tensor([1.0, 2.0, 80.0], dtype=torch.float64)
    dt = t * (1 - 0.999) * (1 + 8 / (1 + torch.exp(t)))  # NVlabs/TCM delta_sigmoid
    torch.testing.assert_close(loss.t_to_r(t, 12), t - dt)
    assert float(loss.t_to_r(torch.tensor(1.0), 0)) == 0.0  # a stage-0 gap past 0: clamped


def test_boundary_rows_are_exactly_a_share_of_the_batch() -> None:
    loss = TCMLoss(boundary_prob=0.25)
    torch.manual_seed(0)
    assert int(loss.boundary_mask(16, CPU).sum()) == 4
    assert int(loss.boundary_mask(7, CPU).sum()) == 1  # int(7 x 0.25)
    assert int(TCMLoss(boundary_prob=0.0).boundary_mask(8, CPU).sum()) == 0


def test_split_function_switches_at_the_transition() -> None:
    def student(x: Tensor, s: Tensor, c: Tensor | None = None) -> Tensor:
        return torch.full_like(x, 1.0)

    def stage1(x: Tensor, s: Tensor, c: Tensor | None = None) -> Tensor:
        return torch.full_like(x, -1.0)

    f = split_function(student, stage1, 1.0)
    out = f(torch.zeros(4, 1, 2, 2), torch.tensor([0.5, 0.999, 1.0, 3.0]))
    assert out[:, 0, 0, 0].tolist() == [-1.0, -1.0, 1.0, 1.0]  # t >= t': the student


def _gaussian_batch(sd: float, n: int = 32) -> Tensor:
    return sd * torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("stage", [4, 12])
def test_objective_is_zero_at_the_exact_consistency_function(stage: int) -> None:
    """Data N(0, sd^2 I) in the limit sd -> 0 (a point mass at 0), where the CT pair
    (x + t z, x + r z) lies on one PF-ODE trajectory: with the exact consistency function
    x sqrt((sd^2 + eps^2)/(sd^2 + t^2)) as both the stage-1 model and the student, every row
    of the stage-2 objective vanishes (consistency rows, boundary rows at t', rows whose r
    falls below t' and read the stage-1 model); a student that breaks the boundary condition
    at t' is caught by the boundary rows alone. (Stages whose gap reaches r = 0 target the data
    itself, f(x, 0) = x, which differs from this function's f(x, eps) by O(eps).)"""
    eps, sd = 0.003, 0.0
    exact = gaussian_consistency_fn(sigma_data=sd, sigma_min=eps)
    loss = TCMLoss(transition_t=1.0, sigma_max=80.0, boundary_prob=0.25, w_boundary=0.1)
    loss.stage = stage
    images = _gaussian_batch(sd)
    torch.manual_seed(0)
    out = loss(exact, exact, images)
    assert bool(out.boundary.any()) and bool((out.sigma[out.boundary] == 1.0).all())
    assert bool((out.sigma_next[out.boundary] < 1.0).all())  # the target is stage 1's
    assert bool((out.sigma_next > 0).all())
    assert float(out.loss.abs().max()) < 1e-5

    def off(x: Tensor, s: Tensor, c: Tensor | None = None) -> Tensor:  # wrong near t' only
        bump = 1.0 + 0.5 * (s < 1.2).to(x.dtype).view(-1, 1, 1, 1)
        return exact(x, s) * bump

    torch.manual_seed(0)
    bad = loss(off, exact, images)
    assert float(bad.raw[bad.boundary].min()) > 1e-3


def test_student_at_the_transition_equals_the_frozen_stage1_model() -> None:
    """Data N(0, 0.5^2 I) and the exact consistency function: the split function at t' is the
    student's output and equals the frozen stage-1 model's there; each row's loss is the
    closed form ||g(x + t z, t) - g(x + r z, r)|| / (t - r) times its batch weight."""
    eps, sd = 0.003, 0.5
    g = gaussian_consistency_fn(sigma_data=sd, sigma_min=eps)
    x = _gaussian_batch(sd, 8)
    at = torch.full((8,), 1.0)
    f = split_function(g, g, 1.0)
    torch.testing.assert_close(f(x, at), g(x, at))
    loss = TCMLoss(transition_t=1.0, sigma_max=80.0, boundary_prob=0.25, w_boundary=0.1)
    loss.stage = 12
    torch.manual_seed(5)
    out = loss(g, g, x)
    torch.manual_seed(5)  # the same draws, by hand
    loss.sample_t(8, CPU)
    loss.boundary_mask(8, CPU)
    z = torch.randn(8, 3, 4, 4)
    t, r = out.sigma, out.sigma_next
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    want = (g(x + t4 * z, t) - g(x + r4 * z, r)).flatten(1).norm(dim=1) / (t - r)
    torch.testing.assert_close(out.raw, want, rtol=1e-4, atol=1e-5)
    weight = torch.where(out.boundary, torch.tensor(0.1 * 8 / 2), torch.tensor(8 / 6))
    torch.testing.assert_close(out.loss, want * weight, rtol=1e-4, atol=1e-5)
    # the batch mean is TCM's objective: consistency mean + w_b x boundary mean
    total = want[~out.boundary].mean() + 0.1 * want[out.boundary].mean()
    torch.testing.assert_close(out.loss.mean(), total, rtol=1e-4, atol=1e-6)


def test_global_batch_draws_equal_two_shards() -> None:
    """The levels, the boundary rows and the noise of a 2-shard step are the rows of the
    single-process step (DDP equals one process), and so are the per-row losses."""
    g = gaussian_consistency_fn(sigma_data=0.5, sigma_min=0.003)
    x = _gaussian_batch(0.5, 8)
    loss = TCMLoss(transition_t=1.0, boundary_prob=0.25)
    torch.manual_seed(7)
    whole = loss(g, g, x)
    parts = []
    for rank in (0, 1):
        torch.manual_seed(7)
        parts.append(loss(g, g, x[rank * 4 : (rank + 1) * 4], shard=(rank, 2)))
    torch.testing.assert_close(torch.cat([p.sigma for p in parts]), whole.sigma)
    assert torch.equal(torch.cat([p.boundary for p in parts]), whole.boundary)
    torch.testing.assert_close(torch.cat([p.loss for p in parts]), whole.loss)


def test_bad_loss_values_name_the_key() -> None:
    for kwargs, key in (
        ({"time_dist": "cauchy"}, "model.loss.time_dist"),
        ({"df": 0.0}, "model.loss.df"),
        ({"q": 1.0}, "model.loss.q"),
        ({"ratio_limit": 1.0}, "model.loss.ratio_limit"),
        ({"boundary_prob": 1.0}, "model.loss.boundary_prob"),
    ):
        with pytest.raises(ValueError, match=key):
            TCMLoss(**kwargs)


@pytest.mark.parametrize("t", [0.003, 0.001, 80.0, 100.0])
def test_rules_refuse_a_transition_outside_the_sigma_range(t: float) -> None:
    cfg = OmegaConf.create(
        {
            "model": {
                "transition_t": t,
                "stage1_path": "zoo:fmnist_cd",
                "precond": {"sigma_min": 0.003, "sigma_max": 80.0},
            }
        }
    )
    with pytest.raises(ConfigError) as err:
        rules(cfg)
    assert str(err.value) == (
        "model.transition_t must be in (model.precond.sigma_min, model.precond.sigma_max) = "
        f"(0.003, 80.0), got {t}"
    )
    cfg.model.transition_t = 1.0
    rules(cfg)  # inside: passes (the zoo file exists)
    cfg.model.stage1_path = None
    with pytest.raises(ConfigError, match="model.stage1_path is required"):
        rules(cfg)


def test_tcm_is_a_registered_consistency_method() -> None:
    from cmexp import registry

    m = registry.method("tcm")
    assert m.family == "consistency" and m.sampler == "consistency"
    assert "tcm" in registry.kinds("consistency")
    assert np.isfinite(TCMLoss().ratio())
