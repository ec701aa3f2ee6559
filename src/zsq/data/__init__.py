"""Evaluation datasets and calibration images (``.npz``, ``labels.csv`` folders, ImageFolders)."""

from .datasets import (
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    FileImageDataset,
    ImageDataset,
    TensorImageDataset,
    check_labels,
    dataset_labels,
    iter_batches,
    load_dataset,
    open_images,
    unlabeled_images,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "FileImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "check_labels",
    "dataset_labels",
    "iter_batches",
    "load_dataset",
    "open_images",
    "unlabeled_images",
]
