"""The shared preamble of the inference entry points (``cmexp.sample``, ``cmexp.eval``,
``cmexp.tau_search``, ``cmexp.edit``): the model of ``ckpt=`` on its device, its labels and
guidance, the sampler and its options, and the sample sets' plans, all checked against the
model before any file is written. The checkpoint is the source of the sampling settings; the
command line's ``sampler``, ``taus``, ``tau_indices``, ``steps``, ``solver_steps``, ``rho``,
``num_scales`` and ``clip_denoised`` override them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from cmexp.inference.conditional import (
    check_class_labels,
    check_guidance,
    conditioned_model,
    sample_labels,
)
from cmexp.inference.generate import generate, sampler_options
from cmexp.inference.loader import LoadedModel, load_from_config
from cmexp.inference.plan import (
    check_clip_denoised,
    check_sampler,
    nfe,
    sigma_plan,
    solver_plan,
)


def _as_list(value: Any, key: str) -> list[Any] | None:
    """A command-line value that may be one item or a list, as a list (None stays None)."""
    from cmexp.utils.cli import list_or_none

    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return list_or_none(value, key)


@dataclass
class Request:
    """What an inference command line asks of its model.

    ``plans``: ``[(set name, descending sigmas)]``: one-step maps ``"{k}step"`` for each
    ``steps`` k, solver families ``"{sampler}{nfe}nfe"`` for the model's plan or each
    ``solver_steps`` k. ``passes``: network passes per evaluation (2 for classifier-free
    guidance). ``clip_denoised``: that sampling option in effect (the command line's, else the
    model's default; None for a plug-in sampler without it)."""

    loaded: LoadedModel
    device: str
    sampler: str
    options: dict[str, float] = field(default_factory=dict)
    class_labels: list[int] | None = None
    guidance: float | None = None
    passes: int = 1
    plans: list[tuple[str, list[float]]] = field(default_factory=list)
    clip_denoised: bool | None = None

    def nfe(self, sigmas: Sequence[float]) -> int:
        return nfe(sigmas, self.sampler, self.passes)

    def labels(self, seed: int, num: int) -> Tensor | None:
        """``[num]`` labels of images ``seed..seed+num-1`` (None: an unconditional model)."""
        return sample_labels(self.loaded, range(seed, seed + num), self.class_labels)

    def generate(
        self, sigmas: Sequence[float], num: int, seed: int, batch_size: int, progress: bool = True
    ) -> Tensor:
        """``[num,C,H,W]`` images in [-1, 1] of one plan (:func:`cmexp.inference.generate`)."""
        return generate(
            self.loaded,
            num,
            sigmas,
            seed,
            batch_size,
            self.sampler,
            self.device,
            progress=progress,
            options=self.options,
            class_labels=self.class_labels,
            guidance=self.guidance,
            clip_denoised=self.clip_denoised,
        )

    def describe(self, cfg: Any) -> dict[str, Any]:
        """The settings every output file records (``sample.json``, ``metrics.json``)."""
        return {
            "ckpt": str(cfg.ckpt),
            "kind": self.loaded.kind,
            "weights": "ema" if cfg.get("use_ema", True) else "online",
            "sampler": self.sampler,
            "options": self.options,
            "clip_denoised": self.clip_denoised,
            "rho": self.loaded.spec.rho,
            "num_scales": self.loaded.spec.num_scales,
        }


def prepare(
    cfg: Any,
    kinds: tuple[str, ...] | None = None,
    purpose: str = "",
    taus_per_set: bool = False,
) -> Request:
    """Load ``cfg.ckpt`` and build its :class:`Request` from the command line.

    Args:
        kinds: the checkpoint kinds accepted (None: every sampled kind).
        purpose: what the model is for, named in a kind mismatch.
        taus_per_set: ``taus`` serve every ``steps`` k (its first k - 1 entries; ``cmexp.eval``
            scores several sets), instead of being exactly the levels of one set.
    """
    from cmexp.utils.cli import list_or_none

    loaded, device = load_from_config(cfg, kinds=kinds, purpose=purpose)
    class_labels = check_class_labels(
        loaded, list_or_none(cfg.get("class_labels"), "class_labels")
    )
    guidance = check_guidance(loaded, cfg.get("guidance"))
    sampler = check_sampler(cfg.get("sampler"), loaded.spec)  # null: the model's own
    req = Request(
        loaded=loaded,
        device=device,
        sampler=sampler,
        options=sampler_options(sampler, cfg),
        class_labels=class_labels,
        guidance=guidance,
        passes=conditioned_model(loaded, guidance)[1],
        clip_denoised=check_clip_denoised(
            cfg.get("clip_denoised"), loaded.spec, sampler, latent=loaded.latent is not None
        ),
    )
    spec = loaded.spec
    if spec.uses_solver:
        solver_steps = _as_list(cfg.get("solver_steps"), "solver_steps")
        plans = (
            [sigma_plan(spec)]
            if solver_steps is None
            else [solver_plan(spec, k) for k in solver_steps]
        )
        req.plans = [(f"{sampler}{req.nfe(p)}nfe", p) for p in plans]
        return req
    taus = list_or_none(cfg.get("taus"), "taus")
    tau_indices = list_or_none(cfg.get("tau_indices"), "tau_indices")
    for k in _as_list(cfg.get("steps", 1), "steps") or [1]:
        mids = taus[: int(k) - 1] if taus is not None and taus_per_set else taus
        req.plans.append((f"{k}step", sigma_plan(spec, int(k), mids, tau_indices)))
    return req
