"""Raw networks: ``net(x [B,C,H,W], noise_labels [B], class_labels [B] | None) -> [B,C,H,W]``.

They know nothing about sigma (the preconditioning wrappers in ``cmexp.diffusion.precond``
compute c_in and c_noise). Each exposes ``img_resolution``, ``img_channels`` and ``label_dim``.
"""

from cmexp.nets.adm import ADMUNet
from cmexp.nets.autoencoder import ConvAutoencoder
from cmexp.nets.classifier import SmallCNN
from cmexp.nets.tiny import TinyUNet
from cmexp.nets.unet import SongUNet

__all__ = ["ADMUNet", "ConvAutoencoder", "SmallCNN", "SongUNet", "TinyUNet"]
