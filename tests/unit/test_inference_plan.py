"""The one sigma plan of the inference side, against the Karras grid's closed form."""

from __future__ import annotations

import pytest
import torch

from cmexp.diffusion import karras_sigmas
from cmexp.inference import (
    SamplingSpec,
    check_plan,
    check_sampler,
    nfe,
    sampler_options,
    sigma_plan,
    solver_plan,
)
from cmexp.utils.cli import list_or_none, override_key
from cmexp import registry

CD = SamplingSpec(family="consistency", sampler="consistency", num_scales=18, taus=(0.585,))


def test_consistency_plan_precedence() -> None:
    assert sigma_plan(CD, 1) == [80.0]
    assert sigma_plan(CD, 2) == [80.0, 0.585]  # the model's own taus
    assert sigma_plan(CD, 2, taus=[2.0]) == [80.0, 2.0]
    assert sigma_plan(CD, 2, tau_indices=[11])[1] == pytest.approx(
        0.585, abs=1e-3
    )  # CM paper: index 11 of 18
    grid = karras_sigmas(18, dtype=torch.float64).tolist()
    assert sigma_plan(CD, 3) == [80.0, grid[6], grid[12]]  # not enough taus: j * (N // steps)
    assert (
        sigma_plan(CD, 18, tau_indices=range(1, 18)) == grid
    )  # the editors' whole grid, eps included
    assert nfe(sigma_plan(CD, 3), "consistency") == 3


def test_diffusion_plan_is_the_solver_grid_ending_in_zero() -> None:
    edm = SamplingSpec(family="denoiser", num_scales=18)
    plan = sigma_plan(edm, steps=5)  # steps do not apply to an EDM sampler
    assert plan[:-1] == karras_sigmas(18, dtype=torch.float64).tolist() and plan[-1] == 0.0
    assert nfe(plan, "heun") == 35 and nfe(plan, "euler") == 18
    assert nfe(plan, "ddim") == nfe(plan, "ddpm") == 18 and nfe(plan, "edm_sde") == 35


def test_pd_and_explicit_solver_step_plans_end_at_sigma_min() -> None:
    """A k-step PD student samples on k + 1 Karras levels T ... eps (no step into 0, NFE k);
    solver_plan puts a teacher on the same levels, so NFE k compares like with like."""
    pd = SamplingSpec(family="denoiser", num_scales=5, sampler="ddim", final_zero=False)
    plan = sigma_plan(pd)
    assert plan == karras_sigmas(5, dtype=torch.float64).tolist() and plan[-1] == 0.002
    assert nfe(plan, "ddim") == 4 and nfe(plan, "heun") == 8
    edm = SamplingSpec(family="denoiser", num_scales=18)
    assert solver_plan(edm, 4) == plan and solver_plan(edm, 1) == [80.0, 0.002]
    # Karras grids nest: the teacher's 2k-step levels hold the student's k-step ones
    assert solver_plan(edm, 8)[::2] == pytest.approx(solver_plan(edm, 4), rel=1e-12)
    with pytest.raises(ValueError, match="^solver_steps must be an integer >= 1"):
        solver_plan(edm, 0)
    with pytest.raises(ValueError, match="solver_steps applies to diffusion models"):
        solver_plan(CD, 2)


def test_vp_schedule_plans_use_the_trailing_timesteps() -> None:
    from cmexp.diffusion import VPSchedule, cosine_alpha_bars

    sched = VPSchedule(cosine_alpha_bars(100), zero_terminal_snr=True)
    vp = SamplingSpec(
        family="denoiser",
        sigma_min=sched.sigma_min,
        sigma_max=sched.sigma_max,
        num_scales=4,
        sampler="ddim",
        alpha_bars=tuple(sched.alpha_bars.tolist()),
    )
    plan = sigma_plan(vp)
    assert plan[0] == float("inf") and plan[-1] == 0.0 and len(plan) == 5
    assert plan[:-1] == sched.plan(4) and solver_plan(vp, 2) == [*sched.plan(2), 0.0]
    assert nfe(plan, "ddim") == 4
    with pytest.raises(ValueError, match="^sampler=heun cannot start at sigma_max = inf"):
        check_sampler("heun", vp)


def test_sampler_names_and_options_are_checked_naming_the_key() -> None:
    edm = SamplingSpec(family="denoiser")
    assert (
        check_sampler("edm_sde", edm) == "edm_sde"
        and check_sampler("consistency", CD) == "consistency"
    )
    with pytest.raises(
        ValueError,
        match=f"^sampler must be one of {', '.join(registry.samplers())}, got 'plms'",
    ):
        check_sampler("plms", edm)
    with pytest.raises(ValueError, match="^sampler=heun does not fit a consistency model"):
        check_sampler("heun", CD)
    with pytest.raises(ValueError, match="^sampler must be one of consistency"):
        nfe([80.0, 0.0], "plms")
    opts = {"eta": 0.5, "s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    assert sampler_options("ddim", opts) == {"eta": 0.5}
    assert sampler_options("edm_sde", opts) == {
        "s_churn": 40.0,
        "s_tmin": 0.05,
        "s_tmax": 50.0,
        "s_noise": 1.003,
    }
    assert sampler_options("heun", opts) == {}
    for key, value, message in [
        ("eta", -0.5, "^eta must be >= 0"),
        ("s_churn", -1.0, "^s_churn must be >= 0"),
        ("s_tmax", 0.01, "^s_tmax must be >= s_tmin"),
    ]:
        with pytest.raises(ValueError, match=message):
            sampler_options("heun", {**opts, key: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2, "taus": [1.0], "tau_indices": [3]}, "either taus or tau_indices"),
        ({"steps": 2, "tau_indices": [18]}, r"tau_indices entries must be integers in \[1, 17\]"),
        ({"steps": 3, "taus": [0.5]}, "steps=3 needs 2 intermediate noise levels"),
        ({"steps": 3, "taus": [0.5, 2.0]}, "descending"),
        ({"steps": 2, "taus": [100.0]}, r"taus must lie in \[sigma_min=0.002, sigma_max=80.0\)"),
    ],
)
def test_bad_plans_name_the_key(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sigma_plan(CD, **kwargs)


def test_explicit_levels_are_checked_against_the_model_range() -> None:
    assert check_plan([5.38, 2.24], CD, "task.sigmas") == [5.38, 2.24]
    with pytest.raises(
        ValueError, match=r"task.sigmas must lie in \[sigma_min=0.002, sigma_max=80.0\]"
    ):
        check_plan([500.0, 2.0], CD, "task.sigmas")
    with pytest.raises(ValueError, match="task.sigmas must hold at least one"):
        check_plan([], CD, "task.sigmas")


def test_overrides_replace_recorded_values_and_report_conflicts() -> None:
    said: list[str] = []
    spec = CD.with_overrides(said.append, rho=None, num_scales=18)
    assert spec == CD and said == []
    spec = CD.with_overrides(said.append, rho=5, num_scales=None)
    assert spec.rho == 5.0 and said == ["rho=5.0 overrides the checkpoint's rho=7.0"]


def test_command_line_helpers() -> None:
    assert (
        override_key("+model.taus=[1]") == "model.taus"
        and override_key("~callbacks.x") == "callbacks.x"
    )
    assert list_or_none(None, "taus") is None and list_or_none([0.5, 1], "taus") == [0.5, 1]
    with pytest.raises(ValueError, match="taus must be a list of numbers"):
        list_or_none("abc", "taus")
    with pytest.raises(ValueError, match="tau_indices must be a list of numbers"):
        list_or_none(["a"], "tau_indices")


# ------------------------------------------------------------------ the clip_denoised option
def test_clip_denoised_defaults_follow_the_model_and_its_family() -> None:
    from cmexp.inference.plan import check_clip_denoised

    edm = SamplingSpec(family="denoiser", sampler="heun")
    assert check_clip_denoised(None, CD, "consistency") is True  # the CM paper's code
    assert check_clip_denoised(None, edm, "heun") is False  # EDM's generate.py
    assert check_clip_denoised(False, CD, "consistency") is False
    assert check_clip_denoised(True, edm, "ddim") is True
    openai_edm = SamplingSpec(family="denoiser", sampler="heun", clip_denoised=True)
    assert check_clip_denoised(None, openai_edm, "heun") is True  # image_sample.py
    assert check_clip_denoised(False, openai_edm, "heun") is False
    assert check_clip_denoised(None, CD, "consistency", latent=True) is False  # latents
    with pytest.raises(ValueError, match="clip_denoised=true: a latent model samples latents"):
        check_clip_denoised(True, CD, "consistency", latent=True)
    with pytest.raises(ValueError, match="clip_denoised must be true, false or null"):
        check_clip_denoised("yes", CD, "consistency")  # type: ignore[arg-type]


class _Loud(torch.nn.Module):
    """A denoiser / consistency function whose outputs leave [-1, 1]:
    D(x, sigma) = 1.3 x / sqrt(1 + sigma^2) + 0.5."""

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return 1.3 * x / (1 + s**2).sqrt() + 0.5


def test_alg1_clip_denoised_switches_the_intermediate_clamp_only() -> None:
    from cmexp.inference.samplers import run_consistency

    f, z = _Loud(), torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = [80.0, 2.0, 0.5]

    def manual(clamp: bool) -> torch.Tensor:
        x = f(80.0 * z, 80.0)
        for tau in sigmas[1:]:
            x = (x.clamp(-1, 1) if clamp else x) + (tau**2 - 0.002**2) ** 0.5 * fresh
            x = f(x, tau)
        return x.clamp(-1, 1)

    def run(**kw):
        return run_consistency(f, z, sigmas, sigma_min=0.002, noise=lambda x: fresh, **kw)

    torch.testing.assert_close(run(), manual(True))  # the default: clamp, as today
    torch.testing.assert_close(run(clip_denoised=True), manual(True))
    torch.testing.assert_close(run(clip_denoised=False), manual(False))  # ECT's / FastGen's
    assert not torch.allclose(manual(True), manual(False))
    assert run(clip=False).abs().max() > 1  # latents: never clamped


def test_clip_denoised_defaults_follow_each_methods_source() -> None:
    """Alg. 1 clamps each intermediate output in the CM paper's code (CD, CT: the family's
    default); ECT's sampler (locuslab/ect), NVlabs/TCM's generator_fn and FastGen's sCM sampler
    do not. The default reaches cmexp.sample/eval (the checkpoint's spec) and the in-training
    samples (the module's consistency_spec) alike."""
    from cmexp import registry
    from cmexp.inference.plan import SamplingSpec, check_clip_denoised

    want = {"cd": True, "ct": True, "ect": False, "sct": False, "scd": False, "tcm": False}
    for kind, clamp in want.items():
        record = registry.method(kind)
        spec = SamplingSpec(family="consistency", clip_denoised=record.clip_denoised)
        assert check_clip_denoised(None, spec, "consistency") is clamp, kind
        assert check_clip_denoised(True, spec, "consistency") is True, kind  # the option wins

    from cmexp.methods.scm.loss import AdaptiveWeight, JVPTangent, SCMLoss
    from cmexp.methods.scm.module import SCTLitModule
    from cmexp.nets import TinyUNet

    net = TinyUNet(img_resolution=8, img_channels=1, model_channels=8)
    module = SCTLitModule(
        net, SCMLoss(JVPTangent()), weighting=AdaptiveWeight(8), optimizer=torch.optim.Adam
    )
    assert module.sampling_spec().clip_denoised is False


def test_solver_clip_denoised_clamps_the_denoiser_in_every_step() -> None:
    from cmexp.diffusion import sample_heun
    from cmexp.inference.samplers import run_euler, run_heun

    d, z = _Loud(), torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = [*karras_sigmas(4).tolist(), 0.0]
    sig = torch.tensor(sigmas)

    def clamped(x, s, labels=None):
        return d(x, s, labels).clamp(-1, 1)

    want = sample_heun(clamped, z * sig[0], sig).clamp(-1, 1)
    torch.testing.assert_close(run_heun(d, z, sigmas, sigma_min=0.002, clip_denoised=True), want)
    plain = sample_heun(d, z * sig[0], sig).clamp(-1, 1)
    torch.testing.assert_close(run_heun(d, z, sigmas, sigma_min=0.002), plain)  # as today
    assert not torch.allclose(want, plain)
    e1 = run_euler(d, z, sigmas, sigma_min=0.002, clip_denoised=True)
    assert not torch.allclose(e1, run_euler(d, z, sigmas, sigma_min=0.002))


def test_trigflow_sampler_switches_the_intermediate_clamp_only() -> None:
    import math

    from cmexp.diffusion import sample_trigflow

    class Loud(torch.nn.Module):
        sigma_data = 0.5

        def consistency(self, x_t, t, class_labels=None):
            return 3 * x_t

    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ts = [1.5, 1.1]

    def manual(clamp: bool) -> torch.Tensor:
        x = 3 * (0.5 * math.sin(1.5) * z)
        x = x.clamp(-1, 1) if clamp else x
        return (3 * (math.cos(1.1) * x + math.sin(1.1) * 0.5 * fresh)).clamp(-1, 1)

    run = lambda **kw: sample_trigflow(Loud(), z, ts, noise=lambda x: fresh, **kw)  # noqa: E731
    torch.testing.assert_close(run(), manual(True))
    torch.testing.assert_close(run(clip_denoised=False, clip_output=True), manual(False))
    assert not torch.allclose(manual(True), manual(False))
