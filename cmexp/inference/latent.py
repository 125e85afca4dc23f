"""Latent mode's codec: a trained autoencoder plus its scale factor (Rombach et al. 2022, LDM).

Diffusion and consistency models of latent runs (``latent=autoencoder``) train on
``scale * E(x)`` (posterior means, unit variance over the training set) and their samples are
decoded with ``D(z / scale)``. A latent model's checkpoint embeds the codec (weights under
``latent.``, settings in ``checkpoint["cmexp"]["latent"]``), so sampling, evaluation, editing
and the tau search need no other file; the autoencoder checkpoint it came from is recorded
with its SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


from cmexp.inference.checkpoint import CheckpointFile, read_checkpoint
from cmexp.nets.autoencoder import LatentCodec

AUTOENCODER_KINDS = ("autoencoder",)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_codec(source: str | Path, key: str = "latent.autoencoder_path") -> LatentCodec:
    """The codec of an autoencoder checkpoint (``+experiment=fmnist_autoencoder``): its
    weights and recorded scale factor. Errors name ``key``."""
    from hydra.utils import instantiate

    ckpt = read_checkpoint(source, key, AUTOENCODER_KINDS)
    scale = ckpt.meta.get("scale_factor")
    if scale is None:
        raise ValueError(
            f"{key}={source} records no latent scale factor (checkpoint['cmexp']['scale_factor'])"
        )
    net_config = ckpt.net_config()
    net = instantiate(net_config)
    try:
        net.load_state_dict(ckpt.weights("net."))
    except RuntimeError as err:
        raise ValueError(
            f"{key}={source}: its weights do not fit its recorded net config "
            f"({str(err).splitlines()[0]})"
        ) from None
    return LatentCodec(net, float(scale), str(ckpt.path), file_sha256(ckpt.path), net_config)


def codec_from_checkpoint(ckpt: CheckpointFile) -> LatentCodec | None:
    """The codec embedded in a latent model's checkpoint (None for a pixel-space model)."""
    from hydra.utils import instantiate

    info = ckpt.meta.get("latent")
    if not info:
        return None
    net = instantiate(info["net"])
    codec = LatentCodec(
        net,
        info["scale"],
        info.get("autoencoder_path", ""),
        info.get("autoencoder_sha256", ""),
        info["net"],
    )
    try:
        codec.load_state_dict(ckpt.weights("latent."))
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"{ckpt.key}={ckpt.source}: its embedded autoencoder does not load "
            f"({str(err).splitlines()[0]})"
        ) from None
    return codec


def check_latent_shape(codec: LatentCodec, resolution: int, channels: int, where: str) -> None:
    """The network's input shape must be the codec's latent shape: a ValueError naming the
    autoencoder file and ``where`` (the keys that set the network's shape)."""
    if (int(resolution), int(channels)) != (codec.resolution, codec.channels):
        raise ValueError(
            f"latent.autoencoder_path={codec.source} encodes to {codec.channels}x{codec.resolution}x{codec.resolution} "
            f"latents but {where} is {int(channels)}x{int(resolution)}x{int(resolution)}; set "
            f"latent.resolution={codec.resolution} latent.channels={codec.channels}"
        )


def check_teacher_latent(
    teacher_meta: dict[str, Any], codec: LatentCodec | None, teacher_path: str
) -> None:
    """A distilled or tuned student (CD, ECT, sCD, PD) works in its teacher's space: both pixel
    space, or latents of the same autoencoder (SHA-256) and scale. ValueError naming
    ``model.teacher_path`` otherwise."""
    info = teacher_meta.get("latent")
    if codec is None and info:
        raise ValueError(
            f"model.teacher_path={teacher_path} is a latent-space teacher (autoencoder "
            f"{info.get('autoencoder_path')}); train the student with latent=autoencoder and that "
            "latent.autoencoder_path"
        )
    if codec is not None and not info:
        raise ValueError(
            f"model.teacher_path={teacher_path} is a pixel-space teacher but this run trains in latent "
            f"space (latent.autoencoder_path={codec.source}); use a teacher trained with the same "
            "latent.autoencoder_path"
        )
    if (
        codec is not None
        and info
        and (
            info.get("autoencoder_sha256") != codec.sha256
            or abs(float(info["scale"]) - float(codec.scale)) > 1e-6 * float(codec.scale)
        )
    ):
        raise ValueError(
            f"model.teacher_path={teacher_path} was trained on the latents of another autoencoder "
            f"({info.get('autoencoder_path')}, sha256 {str(info.get('autoencoder_sha256'))[:12]}) than "
            f"latent.autoencoder_path={codec.source} (sha256 {codec.sha256[:12]}); use the teacher's"
        )
