"""Glue for Hydra and Lightning (no science here)."""
