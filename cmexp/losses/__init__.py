"""Building blocks shared by the training methods' losses: distances d(x, y) -> [B] and
loss weightings lambda(sigma). A method's own objective lives in its folder
(``cmexp/methods/<name>/loss.py``)."""

from cmexp.losses.distances import (
    L1Distance,
    L2Distance,
    L2NormDistance,
    LPIPSDistance,
    Metric,
    PseudoHuberDistance,
    l1,
    l2,
    pseudo_huber,
)
from cmexp.losses.weighting import (
    ICTWeighting,
    SNRPlusOneWeighting,
    TruncatedSNRWeighting,
    UniformWeighting,
)

__all__ = [
    "ICTWeighting",
    "L1Distance",
    "L2Distance",
    "L2NormDistance",
    "LPIPSDistance",
    "Metric",
    "PseudoHuberDistance",
    "SNRPlusOneWeighting",
    "TruncatedSNRWeighting",
    "UniformWeighting",
    "l1",
    "l2",
    "pseudo_huber",
]
