"""Guidance-scale conditioning of a raw network (guided consistency distillation).

A student distilled from a classifier-free-guided teacher takes the guidance scale w as an
extra input, so one student serves every scale in one step (Meng et al. 2023, "On
distillation of guided diffusion models", Sec. 3: w-conditioned student; Luo et al. 2023,
LCM, Eq. 9 and its w embedding). w is embedded sinusoidally and projected by a linear layer
whose weights and bias start at zero, then added to the network's time embedding: a student
initialised from its teacher starts as exactly the teacher, for every w.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cmexp.nets.layers import PositionalEmbedding


class GuidanceEmbedding(nn.Module):
    """``w [B] -> [B, channels]``: sinusoidal embedding of ``w`` (``dim`` features, periods up
    to ``max_positions``), then a zero-initialised linear layer (output exactly 0 at init).

    Args:
        channels: width of the embedding it is added to (the net's noise/time embedding).
        dim: sinusoidal features (even).
        max_positions: longest period of the sinusoids; w of order 1..20 needs little (LCM
            embeds 1000 w with 10,000; here w itself with 1000, the same resolution per unit).
    """

    def __init__(self, channels: int, dim: int = 64, max_positions: int = 1000) -> None:
        super().__init__()
        self.embed = PositionalEmbedding(dim, max_positions=max_positions)
        self.proj = nn.Linear(dim, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, w: Tensor) -> Tensor:
        """``w``: float ``[B]`` -> ``[B, channels]`` (float32)."""
        return self.proj(self.embed(w.float()))


def prepare_guidance(
    guidance: Tensor | float | None, batch: int, device: torch.device
) -> Tensor | None:
    """``guidance`` as float ``[B]`` (a scalar or ``[1]`` is broadcast), or None.

    Raises:
        ValueError: a shape other than ``[]``, ``[1]`` or ``[B]``.
    """
    if guidance is None:
        return None
    w = torch.as_tensor(guidance, device=device, dtype=torch.float32)
    if w.numel() == 1:
        w = w.reshape(1).expand(batch)
    if w.shape != (batch,):
        raise ValueError(f"guidance must be a scalar or [B={batch}], got {tuple(w.shape)}")
    return w


def guidance_term(
    module: GuidanceEmbedding | None,
    guidance: Tensor | float | None,
    batch: int,
    device: torch.device,
) -> Tensor | None:
    """The embedding to add to the time embedding, or None (no w input: the teacher's function).

    Raises:
        ValueError: a guidance scale given to a net built without ``guidance_embed``.
    """
    if guidance is None:
        return None
    if module is None:
        raise ValueError(
            "guidance given to a net without a guidance-scale input (net.guidance_embed=false); "
            "only guided CD students (model.loss.guidance) take w"
        )
    return module(prepare_guidance(guidance, batch, device))
