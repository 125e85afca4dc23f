"""Losses: distances d(x, y) -> [B], the EDM denoising loss, and the CD/CT objectives."""

from cmexp.losses.consistency import (
    ConsistencyDistillationLoss,
    ConsistencyLossOutput,
    ConsistencyTrainingLoss,
    LognormalIndices,
    UniformIndices,
    replay_rng,
)
from cmexp.losses.edm import EDMLoss
from cmexp.losses.distances import (
    L1Distance,
    L2Distance,
    LPIPSDistance,
    PseudoHuberDistance,
    l1,
    l2,
    pseudo_huber,
)
from cmexp.losses.weighting import ICTWeighting, UniformWeighting

__all__ = [
    "ConsistencyDistillationLoss",
    "ConsistencyLossOutput",
    "ConsistencyTrainingLoss",
    "EDMLoss",
    "ICTWeighting",
    "L1Distance",
    "L2Distance",
    "LPIPSDistance",
    "LognormalIndices",
    "PseudoHuberDistance",
    "UniformIndices",
    "UniformWeighting",
    "l1",
    "l2",
    "pseudo_huber",
    "replay_rng",
]
