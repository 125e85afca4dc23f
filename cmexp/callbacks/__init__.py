"""Lightning callbacks of the suite."""

from cmexp.callbacks.quality import SampleQualityCallback
from cmexp.callbacks.samples import SampleGridCallback

__all__ = ["SampleGridCallback", "SampleQualityCallback"]
