"""cmexp: a Lightning + Hydra experiment suite for Consistency Models (Song et al., 2023)."""

__version__ = "0.1.0"
