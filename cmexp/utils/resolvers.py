"""OmegaConf resolvers of the config tree (registered on import; torch-free).

``${cmexp_label_dim:USE_LABELS,NUM_CLASSES}``: a net's ``label_dim``, ``NUM_CLASSES`` when the
dataset's labels are used (``dataset.use_labels=true``: class-conditional training), else 0.
The nets' configs read it as
``${cmexp_label_dim:${oc.select:dataset.use_labels,false},${dataset.num_classes}}``, so
``dataset.use_labels=true`` alone makes any run class-conditional.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def label_dim(use_labels: Any, num_classes: Any) -> Any:
    """``num_classes`` if ``use_labels`` is true, else 0 (other values are passed through for
    the schema to name: ``dataset.use_labels`` must be true or false)."""
    if use_labels is True:
        return num_classes
    if use_labels is False or use_labels is None:
        return 0
    return use_labels


def register() -> None:
    """Register the resolvers (idempotent)."""
    if not OmegaConf.has_resolver("cmexp_label_dim"):
        OmegaConf.register_new_resolver("cmexp_label_dim", label_dim)


register()
