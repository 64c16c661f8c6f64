"""Image data shared by training, evaluation and pre-tokenization: datasets, decoding and transforms, batch loaders."""

from .datasets import (
    DEFAULT_IMAGE_FILES,
    FOLDER_SPLIT,
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    AnyDataset,
    load_default_image_dataset,
    load_image_dataset,
    prepare_columns,
    resolve_image_columns,
)
from .loaders import (
    ImageBatchLoader,
    SkippedImageCounter,
    build_eval_dataloader,
    build_train_dataloader,
    take_images,
    total_skipped_images,
)
from .transforms import ImageDecoder, ImageTransform, convert_to_rgb, decode_image

__all__ = [
    "DEFAULT_IMAGE_FILES",
    "FOLDER_SPLIT",
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "AnyDataset",
    "ImageBatchLoader",
    "ImageDecoder",
    "ImageTransform",
    "SkippedImageCounter",
    "build_eval_dataloader",
    "build_train_dataloader",
    "convert_to_rgb",
    "decode_image",
    "load_default_image_dataset",
    "load_image_dataset",
    "prepare_columns",
    "resolve_image_columns",
    "take_images",
    "total_skipped_images",
]
