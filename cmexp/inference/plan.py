"""The noise levels a trained model is sampled or edited with: one plan for every caller.

``cmexp.sample``, ``cmexp.eval``, ``cmexp.edit``, ``cmexp.tau_search`` and the training
modules' in-training samples all build their descending ``sigmas`` here, from the
:class:`SamplingSpec` that the checkpoint (or the module) carries. Naming: ``taus`` are the
levels after T of the CM paper's Alg. 1 (``[80, 0.585]`` has ``taus = [0.585]``);
``sigmas`` is always a full explicit descending list (k-diffusion's convention).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cmexp.diffusion.karras import karras_sigmas


@dataclass(frozen=True)
class SamplingSpec:
    """What sampling needs to know about a model, written into its checkpoint.

    Attributes:
        consistency: a consistency function f (Alg. 1) rather than an EDM denoiser D.
        sigma_min, sigma_max: eps and T (0.002, 80).
        rho: curvature of the Karras grid (7).
        num_scales: N of the model's grid: the CD/CT discretisation at the end of training
            (``tau_indices`` index it; CIFAR-10 CD: 18) or the EDM sampler's (18 -> Heun NFE 35).
        taus: default levels after T for multistep sampling (CIFAR-10 CD 2-step: 0.585).
    """

    consistency: bool
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_scales: int = 18
    taus: tuple[float, ...] = ()

    def grid(self) -> Tensor:
        """``[num_scales]`` descending Karras levels (float64), index 0 = T, index N-1 = eps."""
        return karras_sigmas(
            self.num_scales, self.sigma_min, self.sigma_max, self.rho, dtype=torch.float64
        )

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

    EDM denoisers: the solver grid, ``num_scales`` Karras levels and a final 0 (Heun NFE
    2N - 1, Euler N); ``steps``/``taus`` do not apply.
    """
    if not spec.consistency:
        return [*spec.grid().tolist(), 0.0]
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


def nfe(sigmas: Sequence[float] | Tensor, sampler: str) -> int:
    """Network evaluations: one per level for Alg. 1; Heun 2N - 1, Euler N on an N + 1 grid."""
    n = len(sigmas)
    return {"consistency": n, "heun": 2 * (n - 1) - 1, "euler": n - 1}[sampler]
