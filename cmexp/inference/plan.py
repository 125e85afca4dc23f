"""The noise levels a trained model is sampled or edited with: one plan for every caller.

``cmexp.sample``, ``cmexp.eval``, ``cmexp.edit``, ``cmexp.tau_search`` and the training
modules' in-training samples all build their descending ``sigmas`` here, from the
:class:`SamplingSpec` that the checkpoint (or the module) carries. Naming: ``taus`` are the
levels after T of the CM paper's Alg. 1 (``[80, 0.585]`` has ``taus = [0.585]``);
``sigmas`` is always a full explicit descending list (k-diffusion's convention).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cmexp import registry
from cmexp.diffusion.karras import karras_sigmas


@dataclass(frozen=True)
class SamplingSpec:
    """What sampling needs to know about a model, written into its checkpoint.

    Attributes:
        family: what the model computes, so which samplers fit it (``cmexp.registry``):
            "consistency" (a consistency function f, Alg. 1 jumps), "denoiser" (an EDM
            denoiser D, solver plans), or a family a plug-in method registers.
        sigma_min, sigma_max: eps and T (0.002, 80).
        rho: curvature of the Karras grid (7).
        num_scales: N of the model's grid: the CD/CT discretisation at the end of training
            (``tau_indices`` index it; CIFAR-10 CD: 18) or the EDM sampler's (18 -> Heun NFE 35).
        taus: default levels after T for multistep sampling (CIFAR-10 CD 2-step: 0.585).
        sampler: the model's own sampler (consistency models: consistency; EDM: heun; a PD
            student: ddim).
        final_zero: the diffusion plan ends with a step into sigma = 0 (EDM's convention:
            N levels and 0); False: it ends at sigma_min (a PD student's N steps on N + 1
            Karras levels, the CM paper's PD sampler).
        alpha_bars: a discrete VP schedule's ``alpha_bar_t`` (t = 1..T) when the model was
            trained on one (``cmexp.diffusion.VPSchedule``): its grid is then the schedule's
            trailing timesteps instead of the Karras levels (``sigma_max`` may be inf).
        clip_denoised: the model's default of the ``clip_denoised`` sampling option (None: its
            family's, ``cmexp.registry.CLIP_DENOISED``; :func:`check_clip_denoised`).
    """

    family: str = "denoiser"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_scales: int = 18
    taus: tuple[float, ...] = ()
    sampler: str = "heun"
    final_zero: bool = True
    alpha_bars: tuple[float, ...] = ()
    clip_denoised: bool | None = None

    @property
    def uses_solver(self) -> bool:
        """Sampled by integrating an ODE/SDE over a solver grid (a denoiser), rather than by
        jumps ``[T, tau_1, ...]`` of a one-step map (consistency and flow-map families)."""
        return self.family in registry.SOLVER_FAMILIES

    def grid(self, num_scales: int | None = None) -> Tensor:
        """``[num_scales]`` descending levels (float64), index 0 = T: the Karras grid (index
        N-1 = eps), or the VP schedule's trailing timesteps."""
        n = self.num_scales if num_scales is None else int(num_scales)
        if self.alpha_bars:
            from cmexp.diffusion.vp import VPSchedule

            return torch.tensor(VPSchedule(self.alpha_bars).plan(n), dtype=torch.float64)
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho, dtype=torch.float64)

    def with_overrides(
        self, warn: Callable[[str], None] | None = None, **values: object
    ) -> SamplingSpec:
        """A copy with the command line's non-null values; each one that differs from the
        checkpoint's is reported through ``warn`` (the checkpoint is the source of truth)."""
        changes = {}
        for name, value in values.items():
            if value is None:
                continue
            current = getattr(self, name)
            value = (
                type(current)(value)
                if not isinstance(current, tuple)
                else tuple(float(v) for v in value)
            )  # type: ignore[arg-type]
            if value != current and warn is not None:
                warn(f"{name}={value} overrides the checkpoint's {name}={current}")
            changes[name] = value
        return replace(self, **changes)


def check_plan(
    sigmas: Sequence[float] | Tensor, spec: SamplingSpec, key: str = "sigmas"
) -> list[float]:
    """Explicit noise levels as floats: at least one, strictly descending, inside
    ``[sigma_min, sigma_max]``; otherwise a ValueError naming ``key``."""
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not sig:
        raise ValueError(f"{key} must hold at least one noise level")
    if any(b >= a for a, b in itertools.pairwise(sig)):
        raise ValueError(f"{key} must be strictly descending, got {sig}")
    if sig[0] > spec.sigma_max or sig[-1] < spec.sigma_min:
        raise ValueError(
            f"{key} must lie in [sigma_min={spec.sigma_min}, sigma_max={spec.sigma_max}], got {sig}"
        )
    return sig


def sigma_plan(
    spec: SamplingSpec,
    steps: int = 1,
    taus: Sequence[float] | None = None,
    tau_indices: Sequence[int] | None = None,
) -> list[float]:
    """The descending noise levels to sample ``spec``'s model with.

    Consistency models (CM paper Alg. 1): ``[T, tau_1, ..., tau_{steps-1}]`` (NFE = steps).
    Precedence: explicit ``taus``; else ``tau_indices`` into the model's grid (index 0 = T;
    CIFAR-10 CD 2-step: index 11 of N = 18 = 0.585); else the model's own ``spec.taus`` when
    it has enough; else evenly spaced grid indices ``j * (N // steps)`` (diffusers' spacing).
    ``tau_indices = 1..N-1`` gives the whole grid (the editors' default).

    Diffusion models (EDM, PD, VP teachers): the solver grid, ``num_scales`` levels and a
    final 0 (Heun NFE 2N - 1, Euler/DDIM/DDPM N), or for a PD student its ``num_scales``
    = N + 1 levels ending at sigma_min (DDIM NFE N); ``steps``/``taus`` do not apply. Use
    :func:`solver_plan` for an explicit step count.
    """
    if spec.uses_solver:
        grid = spec.grid().tolist()
        return [*grid, 0.0] if spec.final_zero or spec.alpha_bars else grid
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    if taus is not None and tau_indices is not None:
        raise ValueError("give either taus or tau_indices, not both")
    n = spec.num_scales
    if taus is not None:
        mids, src = [float(t) for t in taus], "taus"
    elif tau_indices is not None:
        for j in tau_indices:
            if int(j) != j or not 0 < int(j) < n:
                raise ValueError(
                    f"tau_indices entries must be integers in [1, {n - 1}] (num_scales={n}), got {j}"
                )
        grid = spec.grid()
        mids, src = [float(grid[int(j)]) for j in tau_indices], "tau_indices"
    elif len(spec.taus) >= steps - 1:
        mids, src = list(spec.taus[: steps - 1]), "the checkpoint's taus"
    else:
        grid = spec.grid()
        mids, src = [float(grid[j * (n // steps)]) for j in range(1, steps)], "the default spacing"
    if len(mids) != steps - 1:
        raise ValueError(
            f"steps={steps} needs {steps - 1} intermediate noise levels (taus), got {len(mids)} from {src}"
        )
    if any(not spec.sigma_min <= t < spec.sigma_max for t in mids):
        raise ValueError(
            f"{src} must lie in [sigma_min={spec.sigma_min}, sigma_max={spec.sigma_max}), got {mids}"
        )
    return check_plan([spec.sigma_max, *mids], spec, key=src)


def solver_plan(spec: SamplingSpec, solver_steps: int) -> list[float]:
    """A diffusion model's plan with an explicit number of solver steps ``k``: the ``k + 1``
    Karras levels from sigma_max to sigma_min (the grid of a k-step PD student, so the
    teacher and the student are compared on the same levels; Euler/DDIM/DDPM NFE k, Heun and
    EDM-SDE 2k), or, for a VP schedule, its ``k`` trailing timesteps and a final 0."""
    if not spec.uses_solver:
        raise ValueError(
            f"solver_steps applies to diffusion models; {spec.family} models take steps="
        )
    if int(solver_steps) != solver_steps or solver_steps < 1:
        raise ValueError(f"solver_steps must be an integer >= 1, got {solver_steps!r}")
    k = int(solver_steps)
    if spec.alpha_bars:
        return [*spec.grid(k).tolist(), 0.0]
    return spec.grid(k + 1).tolist()


def check_sampler(sampler: str | None, spec: SamplingSpec) -> str:
    """``sampler`` (None: the model's own, ``spec.sampler``) when it is registered for the
    model's family (``cmexp.registry``), else a ValueError naming ``sampler``."""
    name = spec.sampler if sampler is None else str(sampler)
    fits = registry.samplers(spec.family)
    if name not in registry.samplers():
        raise ValueError(f"sampler must be one of {', '.join(registry.samplers())}, got {name!r}")
    if name not in fits:
        raise ValueError(
            f"sampler={name} does not fit a {spec.family} model (its samplers: {', '.join(fits)})"
        )
    if registry.sampler(name).finite_start and math.isinf(spec.sigma_max):
        raise ValueError(
            f"sampler={name} cannot start at sigma_max = inf (a zero-terminal-SNR model); "
            f"use one of {', '.join(s for s in fits if not registry.sampler(s).finite_start)}"
        )
    return name


def check_clip_denoised(
    value: bool | None, spec: SamplingSpec, sampler: str, latent: bool = False
) -> bool | None:
    """The ``clip_denoised`` sampling option in effect (None: the model's default): clamp to
    [-1, 1] each intermediate output of Alg. 1 before re-noising, or the denoiser's output in
    every solver step. The default is the model's (``spec.clip_denoised``: its checkpoint's,
    e.g. True for an openai/consistency_models EDM file, as its ``image_sample.py``), else its
    family's (consistency: True, denoiser: False); a latent model's is False (latents are not
    in [-1, 1]) and true is refused there. None for a plug-in sampler that takes no such
    option (true is then refused: it would be ignored)."""
    import inspect

    if value is not None and not isinstance(value, bool):
        raise ValueError(f"clip_denoised must be true, false or null, got {value!r}")
    if latent:
        if value:
            raise ValueError(
                "clip_denoised=true: a latent model samples latents, which are not in [-1, 1]; "
                "leave clip_denoised out (or false)"
            )
        value = False
    params = inspect.signature(registry.load(registry.sampler(sampler).run)).parameters
    takes = "clip_denoised" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    default = spec.clip_denoised
    if default is None:
        default = registry.CLIP_DENOISED.get(spec.family)
    resolved = default if value is None else value
    if not takes:
        if value:
            raise ValueError(f"clip_denoised=true: sampler={sampler} takes no clip_denoised")
        return None
    return None if resolved is None else bool(resolved)


def nfe(sigmas: Sequence[float] | Tensor, sampler: str, passes: int = 1) -> int:
    """Network evaluations of a plan with ``sampler`` (its registered count: one per level for
    Alg. 1; Euler/DDIM/DDPM one per step; Heun and EDM-SDE two per step, one for a final step
    into 0), times ``passes`` network passes per evaluation (classifier-free guidance: 2,
    conditional and unconditional; ``cmexp.diffusion.guidance``)."""
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if int(passes) != passes or passes < 1:
        raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
    return registry.sampler(sampler).nfe(sig) * int(passes)
