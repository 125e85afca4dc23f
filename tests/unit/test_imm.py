"""IMM (Zhou, Ermon, Song 2025; cmexp/methods/imm): closed-form checks of the MMD, the loss,
the r(s, t) mapping, the weighting, the flow-map parameterisation and the pushforward
samplers, the registry record and the config rules. CPU, tiny, fast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from cmexp import registry
from cmexp.methods.imm.loss import IMMLoss, laplace_kernel, mmd_squared
from cmexp.methods.imm.precond import (
    IMMPrecond,
    fm_time,
    sigma_of_fm_time,
    simple_edm_coefficients,
)
from cmexp.methods.imm.rules import rules
from cmexp.methods.imm.sampler import run_pushforward, run_pushforward_restart
from cmexp.nets import TinyUNet
from cmexp.utils.checks import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


class GaussianFlowMap(nn.Module):
    """The exact flow map of data ~ N(0, c^2 I) in sigma: x_s = x_t sqrt((c^2 + s^2) / (c^2 +
    t^2)) (the PF-ODE of an isotropic Gaussian is this linear scaling), times ``lam``, plus
    ``shift`` (lam = 1, shift = 0: the exact pushforward)."""

    def __init__(self, c: float = 0.5, lam: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.c, self.lam, self.shift = c, lam, shift
        self.sigma_min, self.sigma_max, self.sigma_data = 0.01, 2.0, 0.5

    def forward(
        self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None, sigma_next=None
    ) -> Tensor:
        t = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        s = self.sigma_min if sigma_next is None else sigma_next
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.lam * x * ((self.c**2 + s**2) / (self.c**2 + t**2)).sqrt() + self.shift


def _fixed_times(sigma_t: float, sigma_s: float):
    def draw(groups, device, model, shard=(0, 1)):
        return torch.full((groups,), sigma_t), torch.full((groups,), sigma_s)

    return draw


# ------------------------------------------------------------------ the MMD
def test_mmd_of_two_identical_particle_sets_is_zero() -> None:
    torch.manual_seed(0)
    y = torch.randn(3, 4, 12)
    bw = torch.tensor([0.1, 1.0, 10.0])
    assert torch.equal(mmd_squared(y, y.clone(), bw), torch.zeros(3))
    other = y + 0.5 * torch.randn_like(y)
    assert (mmd_squared(y, other, bw) > 0).all()


def test_laplace_kernel_closed_form_and_a_finite_gradient_at_zero_distance() -> None:
    x = torch.zeros(1, 2, 4, requires_grad=True)
    y = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]])
    k = laplace_kernel(x, y, torch.tensor([0.5]))
    kv = k.detach()
    # ||x - y_1|| = 5, D = 4, bandwidth 0.5: exp(-5 / 2)
    assert float(kv[0, 0, 1]) == pytest.approx(math.exp(-2.5))
    assert float(kv[0, 0, 0]) == pytest.approx(1.0)
    k.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_loss_is_minimised_by_the_exact_pushforward_of_a_gaussian(seed: int) -> None:
    """Data N(0, 0.5^2), one group of 1024 particles at t = 1, s = 0.3, r = t - (2 - 0.01)/4:
    the online map lam * exact against the exact target x_r -> s. The distribution-level loss
    is smallest at the exact map (lam = 1) and grows with |lam - 1| and with a shift."""
    loss = IMMLoss(group_size=1024, decrement_k=2)
    loss.sample_times = _fixed_times(1.0, 0.3)
    values = {}
    for lam in (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25):
        torch.manual_seed(seed)
        x = 0.5 * torch.randn(1024, 1, 2, 2)
        out = loss(GaussianFlowMap(lam=lam), x, target=GaussianFlowMap())
        values[lam] = float(out.loss.mean())
    assert float(out.sigma_r[0]) == pytest.approx(1.0 - 1.99 / 4)  # x_r != x_t: a real r
    assert min(values, key=values.get) == 1.0
    assert values[0.9] < values[0.8] and values[1.1] < values[1.25]
    torch.manual_seed(seed)
    x = 0.5 * torch.randn(1024, 1, 2, 2)
    shifted = float(loss(GaussianFlowMap(shift=0.1), x, target=GaussianFlowMap()).loss.mean())
    assert shifted > 5 * values[1.0]


def test_one_particle_groups_are_a_first_moment_match() -> None:
    """M = 1: w (2 - 2 k(y, yhat)) (IMM Sec. 5: consistency training's special case)."""
    loss = IMMLoss(group_size=1)
    loss.sample_times = _fixed_times(1.0, 0.3)
    torch.manual_seed(0)
    x = 0.5 * torch.randn(3, 1, 2, 2)
    out = loss(GaussianFlowMap(lam=1.2), x, target=GaussianFlowMap())
    assert out.loss.shape == (3,) and (out.loss > 0).all()


# ------------------------------------------------------------------ mapping and weighting
def test_mapping_is_a_constant_decrement_in_sigma_floored_at_s() -> None:
    loss = IMMLoss(decrement_k=3)
    t = torch.tensor([10.0, 1.0, 0.5])
    s = torch.tensor([1.0, 0.2, 0.45])
    r = loss.mapping(t, s, sigma_min=0.0, sigma_max=8.0)  # step 8 / 2^3 = 1
    assert torch.allclose(r, torch.tensor([9.0, 0.2, 0.45]))
    assert ((r >= s) & (r < t)).all()


def test_weighting_is_eq_13_with_the_fm_logsnr() -> None:
    loss = IMMLoss(alpha_power=1.0, logsnr_shift=5.0)
    # t = 1/2: lambda = 0, -dlambda/dt = 8, alpha^a / (alpha^2 + t^2) = 0.5 / 0.5
    expected = 0.5 * (1 / (1 + math.exp(-5.0))) * 8.0 * 1.0
    assert float(loss.weight(torch.tensor(0.5))) == pytest.approx(expected)
    # t = 0.2: lambda = 2 ln 4
    lam = 2 * math.log(4.0)
    w = 0.5 / (1 + math.exp(-(5.0 - lam))) * 2 / (0.2 * 0.8) * 0.8 / (0.64 + 0.04)
    assert float(loss.weight(torch.tensor(0.2))) == pytest.approx(w)


def test_times_are_uniform_in_fm_time_with_s_below_t() -> None:
    loss = IMMLoss()
    model = GaussianFlowMap()
    torch.manual_seed(0)
    sig_t, sig_s = loss.sample_times(4000, torch.device("cpu"), model)
    t, s = fm_time(sig_t, 0.5), fm_time(sig_s, 0.5)
    lo, hi = 0.01 / 0.51, 2.0 / 2.5
    assert float(t.min()) >= lo - 1e-6 and float(t.max()) <= hi + 1e-6
    assert float(t.mean()) == pytest.approx((lo + hi) / 2, abs=0.02)
    assert (s <= t).all() and float(sig_s.min()) >= 0.01


# ------------------------------------------------------------------ the flow map
def _net() -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(
        img_resolution=8, img_channels=1, model_channels=8, guidance_embed=True, init_scale=1.0
    )


def test_sigma_and_fm_time_convert_as_the_ot_path() -> None:
    t = torch.tensor([0.006, 0.5, 0.994], dtype=torch.float64)
    sigma = sigma_of_fm_time(t, 0.5)
    assert sigma.tolist() == pytest.approx([0.5 * 0.006 / 0.994, 0.5, 0.5 * 0.994 / 0.006])
    assert torch.allclose(fm_time(sigma, 0.5), t)
    # IMM's 2-step mid eta = 1.4 is sigma = 0.7: t = 1.4 / 2.4
    assert float(fm_time(torch.tensor(0.7), 0.5)) == pytest.approx(1.4 / 2.4)


def test_flow_map_is_the_identity_at_s_equals_t_and_the_fm_formula_otherwise() -> None:
    model = IMMPrecond(_net())
    with torch.no_grad():
        model.net.guidance_embed.proj.weight.normal_()  # make the s input matter
    torch.manual_seed(1)
    x = torch.randn(2, 1, 8, 8)
    sig = torch.tensor([3.0, 0.4])
    assert torch.allclose(model(x, sig, sigma_next=sig), x, atol=1e-6)
    s = torch.tensor([0.5, 0.1])
    t_fm, s_fm = fm_time(sig, 0.5), fm_time(s, 0.5)
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in simple_edm_coefficients(t_fm, s_fm, 0.5))
    x_fm = (1 - t_fm).view(-1, 1, 1, 1) * x
    g = model.net(c_in * x_fm, 1000 * t_fm, None, guidance=1000 * s_fm)
    expected = (c_skip * x_fm + c_out * g) / (1 - s_fm).view(-1, 1, 1, 1)
    assert torch.allclose(model(x, sig, sigma_next=s), expected, atol=1e-5)
    # without sigma_next: the map to the data end sigma_min
    assert torch.allclose(model(x, sig), model(x, sig, sigma_next=model.sigma_min))


def test_the_wrapper_needs_a_second_time_input_and_rebuilds_from_meta() -> None:
    with pytest.raises(ValueError, match="net.guidance_embed=true"):
        IMMPrecond(TinyUNet(img_resolution=8, img_channels=1, model_channels=8))
    model = IMMPrecond(_net(), 0.01, 50.0, 0.5, 1000.0)
    meta = {"sigma_min": 0.01, "sigma_max": 50.0, "sigma_data": 0.5, "c_noise_scale": 1000.0}
    again = IMMPrecond.from_meta(_net(), meta)
    assert (again.sigma_min, again.sigma_max, again.c_noise_scale) == (0.01, 50.0, 1000.0)
    assert model.describe() == {"name": "imm"}


# ------------------------------------------------------------------ the samplers
def test_pushforward_steps_compose_for_an_exact_flow_map() -> None:
    """One jump T -> sigma_min equals two jumps T -> 0.7 -> sigma_min for the exact map, and
    the samples have the data's distribution N(0, c^2 + sigma_min^2)."""
    model = GaussianFlowMap()
    torch.manual_seed(0)
    z = torch.randn(4000, 1, 2, 2)
    one = run_pushforward(model, z, [2.0], sigma_min=0.01, clip=False)
    two = run_pushforward(model, z, [2.0, 0.7], sigma_min=0.01, clip=False)
    assert torch.allclose(one, two, atol=1e-6)
    assert float(one.std()) == pytest.approx(math.sqrt(0.25 + 1e-4), rel=0.03)
    assert run_pushforward(model, 10 * z, [2.0], sigma_min=0.01).abs().max() <= 1.0  # clip


def test_restart_sampling_jumps_to_the_data_end_then_renoises() -> None:
    model = GaussianFlowMap()
    z = torch.randn(6, 1, 2, 2)
    fresh = torch.randn(6, 1, 2, 2)
    out = run_pushforward_restart(
        model, z, [2.0, 0.7], sigma_min=0.01, noise=lambda x: fresh, clip=False
    )
    x0 = model(z * 2.0, 2.0, sigma_next=0.01)
    assert torch.allclose(out, model(x0 + 0.7 * fresh, 0.7, sigma_next=0.01))


def test_registry_record_and_samplers() -> None:
    m = registry.method("imm")
    assert m.family == "flow_map" and m.sampler == "pushforward" and m.teacher is None
    # the family is shared with other flow maps (MeanFlow's sampler); IMM's start at T z
    assert {"pushforward", "pushforward_restart"} <= set(registry.samplers("flow_map"))
    assert registry.sampler("pushforward").finite_start
    assert registry.sampler("pushforward_restart").finite_start
    assert registry.sampler("pushforward").nfe([82.8, 0.7]) == 2
    assert "imm" not in registry.kinds("consistency")  # no tau search / editing


# ------------------------------------------------------------------ batches, DDP, configs
def test_group_size_must_divide_the_batch() -> None:
    loss = IMMLoss(group_size=3)
    with pytest.raises(ValueError, match="model.loss.group_size=3 must divide the batch of 8"):
        loss(GaussianFlowMap(), torch.zeros(8, 1, 2, 2))


def test_two_shards_compute_the_single_process_loss() -> None:
    """Times (per group) and noise (per image) are drawn for the global batch and sliced: two
    ranks holding 2 groups each give the rows of one process holding 4 groups."""
    loss = IMMLoss(group_size=2)
    model = IMMPrecond(_net(), 0.01, 50.0)
    x = torch.randn(8, 1, 8, 8)
    torch.manual_seed(5)
    full = loss(model, x).loss
    halves = []
    for rank in (0, 1):
        torch.manual_seed(5)
        halves.append(loss(model, x[4 * rank : 4 * rank + 4], shard=(rank, 2)).loss)
    assert torch.allclose(torch.cat(halves), full, atol=1e-6)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_cifar10_recipe_has_the_papers_values() -> None:
    """lumalabs/imm configs/cifar10_generate_images.yaml (network, sampling) and the values
    recalled from the paper's appendix table (docs/modes.md (IMM) marks them unconfirmed)."""
    cfg = _compose("+experiment=cifar10_imm")
    assert cfg.model._target_ == "cmexp.methods.imm.module.IMMLitModule"
    net = cfg.net
    assert (net.model_channels, list(net.channel_mult), list(net.resample_filter)) == (
        128,
        [2, 2, 2],
        [1, 1],
    )
    assert net.embedding_type == "positional" and net.positional_endpoint is True
    assert net.dropout == 0.2 and net.guidance_embed is True and net.label_dim == 0
    p = cfg.model.precond
    assert p._target_ == "cmexp.methods.imm.precond.IMMPrecond"
    assert p.sigma_min == pytest.approx(0.5 * 0.006 / 0.994)  # eps = 0.006
    assert p.sigma_max == pytest.approx(0.5 * 0.994 / 0.006)  # T = 0.994
    assert (p.sigma_data, p.c_noise_scale) == (0.5, 1000.0)
    assert list(cfg.model.taus) == [0.7]  # mid_nt 1.4 x sd
    loss = cfg.model.loss
    assert (loss.group_size, loss.decrement_k, loss.alpha_power, loss.logsnr_shift) == (
        4,
        15.0,
        1.0,
        5.0,
    )
    opt = cfg.model.optimizer
    assert (
        opt._target_ == "torch.optim.Adam" and opt.lr == 1e-4 and list(opt.betas) == [0.9, 0.999]
    )
    assert cfg.model.ema_decay == 0.9999
    assert cfg.global_batch_size == 4096 and cfg.dataset.batch_size == 512
    assert cfg.trainer.max_steps == 400_000


def test_group_size_that_does_not_divide_the_batch_is_one_line_naming_the_key() -> None:
    cfg = _compose("+experiment=fmnist_imm", "model.loss.group_size=5")
    with pytest.raises(ConfigError) as err:
        rules(cfg)
    assert str(err.value) == (
        "model.loss.group_size=5 must divide dataset.batch_size=64 (the per-device batch is "
        "split into particle groups of this size; a group never straddles batches or devices)"
    )
    cfg = _compose("+experiment=fmnist_imm", "net.guidance_embed=false")
    with pytest.raises(ConfigError, match="net.guidance_embed=true"):
        rules(cfg)
    rules(_compose("+experiment=fmnist_imm"))  # the recipe itself passes
