"""Real images for the inference side: the reference set of metrics, the inputs of editing,
and the restoration metrics that compare an edit with its ground truth."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def reference_datamodule(dataset: dict[str, Any], data_dir: str | None = None) -> Any:
    """The whole dataset of a run's ``dataset`` config (``subset`` dropped), optionally read
    from another ``data_dir``."""
    from hydra.utils import instantiate

    if not dataset or "_target_" not in dataset:
        raise ValueError("the checkpoint records no dataset; pass images_dir=/path/to/images")
    dcfg = {**dataset, "subset": None}
    if data_dir:
        dcfg["data_dir"] = str(data_dir)
    return instantiate(dcfg)


def real_images(
    dataset: dict[str, Any],
    num: int,
    split: str,
    resolution: int,
    channels: int,
    images_dir: str | None = None,
    data_dir: str | None = None,
) -> Tensor:
    """``[num, C, H, W]`` real images in [-1, 1] at ``resolution``/``channels``: from the
    folder ``images_dir``, else from ``split`` of the ``dataset`` config (a checkpoint's)."""
    from cmexp.data import ImageFolderDataModule

    if images_dir:
        dm = ImageFolderDataModule(
            data_dir=images_dir,
            resolution=resolution,
            channels=channels,
            num_classes=0,
            key="images_dir",
        )
        split = "train"
    else:
        dm = reference_datamodule(dataset, data_dir)
    return dm.real_images(int(num), str(split))


def restoration_metrics(
    result: Tensor, truth: Tensor, lpips_weights_path: str | None = None
) -> dict[str, Any]:
    """PSNR (dB) and SSIM on [0, 1] images (torchmetrics), LPIPS (VGG) where its weights
    exist (``metric.weights_path`` or the torch hub cache); ``[B,C,H,W]`` inputs in [-1, 1]."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    a, b = (result.clamp(-1, 1) + 1) / 2, (truth.clamp(-1, 1) + 1) / 2
    out: dict[str, Any] = {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(a, b, data_range=1.0)),
    }
    try:
        from cmexp.losses.distances import LPIPSDistance

        lp = LPIPSDistance("vgg", lpips_weights_path, resize=None)
        out["lpips"] = float(lp(result.clamp(-1, 1), truth).mean())
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as err:
        out["lpips"] = None
        out["lpips_skipped"] = str(err).splitlines()[0]
    return out
