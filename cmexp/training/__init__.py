"""Shared training machinery of every method: the LightningModule base (optimizer, sampling
EMA, exact resume, self-describing checkpoints, in-training samples through the shared
generate path) and teacher loading."""
