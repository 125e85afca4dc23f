"""Class labels and guidance scales at inference: what a conditional model is sampled with.

* Labels: a class-conditional model samples image i with ``class_labels[i % len]`` when
  labels are given, else with a label drawn from image i's seed
  (:func:`cmexp.diffusion.guidance.seeded_labels`), so a seed gives the same label and image
  whatever the batch size. Unconditional models take no labels.
* Guidance (``guidance=w``; ``D_w = D_u + w (D_c - D_u)``, w = 1 plain conditional): a
  conditional diffusion model samples through :class:`GuidedDenoiser` (2 network passes per
  evaluation, counted in the NFE); a guided CD student (checkpoint entry ``guidance``: the
  range it was distilled for) takes w as an input (1 pass) and defaults to its recorded scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cmexp.diffusion.guidance import GUIDED_PASSES, GuidedDenoiser, ScaleConditioned, seeded_labels


def check_class_labels(
    loaded: Any, class_labels: Sequence[int] | None, key: str = "class_labels"
) -> list[int] | None:
    """``class_labels`` as ints when they fit the model, else a ValueError naming ``key``."""
    if class_labels is None:
        return None
    labels = [int(c) for c in class_labels]
    if loaded.label_dim == 0:
        raise ValueError(
            f"{key}={labels} given but {loaded.source or 'the model'} is unconditional (label_dim=0); "
            "drop it or use a class-conditional checkpoint (dataset.use_labels=true)"
        )
    if not labels:
        raise ValueError(f"{key} must hold at least one class index")
    bad = [c for c in labels if not 0 <= c < loaded.label_dim]
    if bad:
        raise ValueError(
            f"{key} entry {bad[0]} is out of range: the model has {loaded.label_dim} classes "
            f"(0..{loaded.label_dim - 1})"
        )
    return labels


def sample_labels(
    loaded: Any, seeds: range, class_labels: Sequence[int] | None = None, offset: int = 0
) -> Tensor | None:
    """``[len(seeds)]`` labels of the images with these seeds (image ``offset + j`` of the
    request gets ``class_labels[(offset + j) % len]``), or None for an unconditional model."""
    if loaded.label_dim == 0:
        return None
    labels = check_class_labels(loaded, class_labels)
    if labels is not None:
        import torch

        return torch.tensor(
            [labels[(offset + j) % len(labels)] for j in range(len(seeds))], dtype=torch.long
        )
    return seeded_labels(seeds, loaded.label_dim)


def guidance_range(loaded: Any) -> dict[str, float] | None:
    """The w range a guided CD student was distilled for (``checkpoint["cmexp"]["guidance"]``)."""
    g = (loaded.meta or {}).get("guidance")
    return dict(g) if g else None


def check_guidance(loaded: Any, guidance: float | None, key: str = "guidance") -> float | None:
    """The guidance scale to sample with (None: none), checked against the model."""
    g = guidance_range(loaded)
    if guidance is None:
        return float(g["sample"]) if g is not None else None
    w = float(guidance)
    if not w >= 0:
        raise ValueError(f"{key} must be a number >= 0, got {guidance}")
    if loaded.label_dim == 0:
        raise ValueError(
            f"{key}={guidance} needs a class-conditional model (classifier-free guidance), but "
            f"{loaded.source or 'the model'} is unconditional (label_dim=0)"
        )
    if not loaded.spec.uses_solver:  # a one-step map takes w as an input (guided CD)
        if g is None:
            raise ValueError(
                f"{key}={guidance}: this '{loaded.kind}' model was distilled without guidance (it takes no "
                "w); guide its teacher, or distil a guided student (model.loss.guidance)"
            )
        if not g["w_min"] <= w <= g["w_max"]:
            raise ValueError(
                f"{key}={guidance} is outside the range the student was distilled for "
                f"[{g['w_min']}, {g['w_max']}]"
            )
    return w


def conditioned_model(loaded: Any, guidance: float | None) -> tuple[nn.Module, int]:
    """``(model, passes)``: the callable to sample with and its network passes per evaluation
    (2 for a guided diffusion model). ``guidance``: the output of :func:`check_guidance`."""
    model = loaded.model
    if guidance is None:
        return model, 1
    if not loaded.spec.uses_solver:  # a one-step map takes w as an input (guided CD)
        return ScaleConditioned(model, guidance), 1
    if guidance == 1.0:  # D_1 = D_cond exactly: one pass
        return model, 1
    return GuidedDenoiser(model, guidance), GUIDED_PASSES
