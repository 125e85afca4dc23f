"""LightningDataModules (images in [-1, 1]) and the resumable step-indexed training loader."""

from cmexp.data.datamodules import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    GaussianMixtureDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    ImageNet64DataModule,
    MNISTDataModule,
    TensorImageDataset,
    fit_images,
    read_idx,
)
from cmexp.data.loader import StepLoader

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "GaussianMixtureDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNet64DataModule",
    "MNISTDataModule",
    "StepLoader",
    "TensorImageDataset",
    "fit_images",
    "read_idx",
]
