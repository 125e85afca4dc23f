"""Losses: distances d(x, y) -> [B], the EDM denoising loss, the CD/CT objectives,
progressive distillation and the continuous-time sCT/sCD objective."""

from cmexp.losses.consistency import (
    ConsistencyDistillationLoss,
    ConsistencyLossOutput,
    ConsistencyTrainingLoss,
    LognormalIndices,
    UniformIndices,
    replay_rng,
)
from cmexp.losses.distances import (
    L1Distance,
    L2Distance,
    L2NormDistance,
    LPIPSDistance,
    PseudoHuberDistance,
    l1,
    l2,
    pseudo_huber,
)
from cmexp.losses.ect import ECTLoss
from cmexp.losses.edm import EDMLoss
from cmexp.losses.progressive import (
    ProgressiveDistillationLoss,
    ProgressiveLossOutput,
    progressive_target,
)
from cmexp.losses.scm import (
    AdaptiveWeight,
    FiniteDifferenceTangent,
    JVPTangent,
    SCMLoss,
    SCMLossOutput,
)
from cmexp.losses.weighting import (
    ICTWeighting,
    SNRPlusOneWeighting,
    TruncatedSNRWeighting,
    UniformWeighting,
)

__all__ = [
    "AdaptiveWeight",
    "ConsistencyDistillationLoss",
    "ConsistencyLossOutput",
    "ConsistencyTrainingLoss",
    "ECTLoss",
    "EDMLoss",
    "FiniteDifferenceTangent",
    "ICTWeighting",
    "JVPTangent",
    "L1Distance",
    "L2Distance",
    "L2NormDistance",
    "LPIPSDistance",
    "LognormalIndices",
    "ProgressiveDistillationLoss",
    "ProgressiveLossOutput",
    "PseudoHuberDistance",
    "SCMLoss",
    "SCMLossOutput",
    "SNRPlusOneWeighting",
    "TruncatedSNRWeighting",
    "UniformIndices",
    "UniformWeighting",
    "l1",
    "l2",
    "progressive_target",
    "pseudo_huber",
    "replay_rng",
]
