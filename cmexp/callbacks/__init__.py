"""Lightning callbacks of the suite."""

from cmexp.callbacks.samples import SampleGridCallback

__all__ = ["SampleGridCallback"]
