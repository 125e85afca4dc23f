"""cmexp: a Lightning + Hydra experiment suite for Consistency Models (Song et al., 2023)."""

# The config tree's OmegaConf resolvers (``${cmexp_label_dim:...}``) must exist wherever its
# configs are composed: entry points, tests, notebooks, benchmarks (torch-free, ~0.1 s).
import cmexp.utils.resolvers  # noqa: F401

__version__ = "0.1.0"
