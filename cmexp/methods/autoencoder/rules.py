"""Config rules of the latent-mode autoencoder (torch-free)."""

from __future__ import annotations

from cmexp.utils.checks import Int, Num, Rule

SCHEMA: dict[str, Rule] = {
    "model.kl_weight": Num(0),  # LDM's KL-f models: 1e-6
    "model.scale_images": Int(2),
    "model.psnr_images": Int(1),
    "model.eval_batch_size": Int(1),
}
