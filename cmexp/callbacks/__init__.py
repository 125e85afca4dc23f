"""Lightning callbacks of the suite."""

from cmexp.callbacks.checkpoint import StepCheckpoint
from cmexp.callbacks.preemption import PreemptionCallback, TrainingPreempted
from cmexp.callbacks.quality import SampleQualityCallback
from cmexp.callbacks.samples import SampleGridCallback

__all__ = [
    "PreemptionCallback",
    "SampleGridCallback",
    "SampleQualityCallback",
    "StepCheckpoint",
    "TrainingPreempted",
]
