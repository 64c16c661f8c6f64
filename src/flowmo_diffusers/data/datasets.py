"""Image datasets for training, evaluation and pre-tokenization, all through Hugging Face ``datasets``.

:func:`load_image_dataset` loads a Hub/local dataset (``dataset_name``, optionally streaming), an image folder
(``train_data_dir``, ``imagefolder`` builder, labels from sub-folder names) or, with neither, a small embedded
dataset of real photographs shipped inside scikit-image (works offline). :func:`prepare_columns` keeps the image
and label columns and turns off ``datasets``' own image decoding, so that a corrupt file is skipped by
:class:`~flowmo_diffusers.data.transforms.ImageDecoder` instead of raising in the middle of a run.
"""

from __future__ import annotations

import glob
import io
import logging
import os

import datasets
import PIL.Image

from ..utils.images import to_rgb

logger = logging.getLogger(__name__)

AnyDataset = datasets.Dataset | datasets.IterableDataset

#: Column names tried, in order, when the image column is not given and no column has the ``Image`` feature.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "jpg", "jpeg", "png", "webp")
#: Column names tried, in order, when the label column is not given and no column has the ``ClassLabel`` feature.
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "labels", "cls", "class")

#: RGB photographs that ship inside the scikit-image wheel (``skimage.data``) and need no pooch download in
#: scikit-image 0.26 (checked: ``skin``, ``lily``, ``eagle`` do need a download and are left out).
#: Pairs of (class name, file name inside ``skimage.data.data_dir``); the label is the position in this tuple.
DEFAULT_IMAGE_FILES: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("chelsea", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("rocket", "rocket.jpg"),
    ("motorcycle_left", "motorcycle_left.png"),
    ("motorcycle_right", "motorcycle_right.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("retina", "retina.jpg"),
)

#: The one split of an image folder (``train_data_dir``): every image under it, whatever the names.
FOLDER_SPLIT = "train"


#: The offline main job's held-out photographs: never trained on, they are its validation images and its figure.
DEMO_HELD_OUT_IMAGES: tuple[str, ...] = ("chelsea", "coffee")
#: More scikit-image photographs (grayscale ones, converted to RGB when decoded) that the offline main job trains on
#: besides the RGB ones, so that random crops of some twenty photographs teach structure a model can carry over to
#: photographs it has not seen. All ship in the wheel (no pooch download) from scikit-image 0.24 to 0.26.
DEMO_EXTRA_IMAGE_FILES: tuple[tuple[str, str], ...] = (
    ("camera", "camera.png"),
    ("coins", "coins.png"),
    ("moon", "moon.png"),
    ("page", "page.png"),
    ("cell", "cell.png"),
    ("brick", "brick.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("clock", "clock_motion.png"),
    ("color", "color.png"),
    ("logo", "logo.png"),
    ("text", "text.png"),
    ("horse", "horse.png"),
)


def _scikit_image_dataset(files: tuple[tuple[str, str], ...], uncompressed: bool = False) -> datasets.Dataset:
    """In-memory dataset of the named files of ``skimage.data.data_dir``: ``"image"`` (the original bytes, or with
    `uncompressed` the RGB pixels as PPM bytes) and ``"label"`` (one class per file, in order)."""
    import skimage.data  # optional dependency (``train`` extra), imported only when the default is used

    images, labels = [], []
    for label, (class_name, file_name) in enumerate(files):
        path = os.path.join(skimage.data.data_dir, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"scikit-image sample image {file_name!r} ({class_name}) not found at {path}; the embedded default "
                "dataset needs a full scikit-image installation. Pass dataset_name or train_data_dir instead."
            )
        if uncompressed:
            # Training decodes every image of every batch: a 512x512 PNG takes ~12 ms to inflate, its PPM ~1 ms,
            # which on the CPU demo is the difference between the loader and the model setting the pace.
            buffer = io.BytesIO()
            with PIL.Image.open(path) as photo:
                to_rgb(photo).save(buffer, format="PPM")
            images.append({"bytes": buffer.getvalue(), "path": file_name})
        else:
            with open(path, "rb") as image_file:
                images.append({"bytes": image_file.read(), "path": file_name})
        labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[name for name, _ in files])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def load_default_image_dataset() -> datasets.Dataset:
    """Embedded smoke-test dataset: the RGB photographs bundled with scikit-image, fully offline.

    Returns:
        `datasets.Dataset`: in memory, with ``len(DEFAULT_IMAGE_FILES)`` rows, an ``"image"`` column
        (``datasets.Image``; the original PNG/JPEG bytes, so nothing is re-encoded) and a ``"label"`` column
        (``datasets.ClassLabel``, one distinct class per photograph).
    """
    return _scikit_image_dataset(DEFAULT_IMAGE_FILES)


def load_demo_image_datasets() -> tuple[datasets.Dataset, datasets.Dataset]:
    """The offline main job's data: training photographs and held-out ones, disjoint, all from scikit-image.

    Returns:
        `Tuple[datasets.Dataset, datasets.Dataset]`: the training set (the photographs of ``DEFAULT_IMAGE_FILES``
        but ``DEMO_HELD_OUT_IMAGES``, then ``DEMO_EXTRA_IMAGE_FILES``) and the held-out set
        (``DEMO_HELD_OUT_IMAGES``, in that order), with the columns of :func:`load_default_image_dataset`; the
        images are stored as uncompressed RGB (PPM), which decodes ten times faster than the original PNG/JPEG.
    """
    by_name = dict(DEFAULT_IMAGE_FILES)
    training = tuple(item for item in DEFAULT_IMAGE_FILES if item[0] not in DEMO_HELD_OUT_IMAGES)
    held_out = tuple((name, by_name[name]) for name in DEMO_HELD_OUT_IMAGES)
    return (_scikit_image_dataset(training + DEMO_EXTRA_IMAGE_FILES, uncompressed=True),
            _scikit_image_dataset(held_out, uncompressed=True))


def resolve_image_columns(
    dataset: AnyDataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str | None]:
    """Find the image column and the (optional) integer label column of ``dataset``.

    Explicit names are validated. Otherwise the image column is the first column with the ``datasets.Image``
    feature, else the first of :data:`IMAGE_COLUMN_CANDIDATES` present; the label column is the first
    ``ClassLabel`` column, else the first of :data:`LABEL_COLUMN_CANDIDATES` holding integers (any type when the
    features of a streaming dataset are unknown).

    Returns:
        `tuple[str, str | None]`: ``(image_column, label_column)``; ``label_column`` is ``None`` for unlabeled data.

    Raises:
        ValueError: the image column (or a given label column) is missing; the message lists the columns.
    """
    features = dataset.features
    column_names = list(features) if features is not None else (dataset.column_names or [])
    if not column_names and isinstance(dataset, datasets.IterableDataset):
        # Streaming dataset with unknown features (e.g. after .map()): the first example tells the columns.
        first_example = next(iter(dataset.take(1)), {})
        column_names = list(first_example)

    def missing(kind: str, detail: str) -> ValueError:
        return ValueError(
            f"Could not find the {kind} column ({detail}). Available columns: {column_names}. "
            f"Pass {kind}_column=... explicitly."
        )

    if image_column is not None:
        if column_names and image_column not in column_names:
            raise missing("image", f"{image_column!r} is not a column")
    else:
        typed = [name for name in column_names if isinstance(features.get(name), datasets.Image)] if features else []
        named = [name for name in IMAGE_COLUMN_CANDIDATES if name in column_names]
        if typed:
            image_column = next((name for name in named if name in typed), typed[0])
        elif named:
            image_column = named[0]
        else:
            raise missing("image", f"no datasets.Image column and none of {list(IMAGE_COLUMN_CANDIDATES)}")

    if label_column is not None:
        if column_names and label_column not in column_names:
            raise missing("label", f"{label_column!r} is not a column")
        return image_column, label_column

    if features:
        class_label_columns = [name for name in column_names if isinstance(features[name], datasets.ClassLabel)]
        if class_label_columns:
            return image_column, class_label_columns[0]
    for name in LABEL_COLUMN_CANDIDATES:
        if name not in column_names:
            continue
        feature = features.get(name) if features else None
        if feature is None or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
            return image_column, name
    return image_column, None


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> AnyDataset:
    """Load an image dataset with ``datasets`` and normalize its columns to ``"image"`` (+ ``"label"``).

    Args:
        dataset_name (`str`, *optional*):
            Hub id (e.g. the gated ``"ILSVRC/imagenet-1k"``, use ``token`` and ideally ``streaming=True``) or a local
            dataset path understood by ``datasets.load_dataset``.
        dataset_config_name (`str`, *optional*):
            Dataset configuration (``name=`` of ``load_dataset``).
        train_data_dir (`str`, *optional*):
            Folder of images loaded with the ``imagefolder`` builder as one split, ``"train"``, of every image under it
            (sub-folders included, hidden files excluded) whatever the names: no split is inferred from names such as
            ``test_*`` or ``eval/``. Labels come from the sub-folder names when every image sits in a class
            sub-folder. Ignored if ``dataset_name`` is given.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load (``"train"``, ``"validation"``, slicing such as ``"train[:1000]"`` for map-style). A folder
            has only ``"train"``. The embedded default dataset returns the same photographs for every split.
        streaming (`bool`, *optional*, defaults to `False`):
            Return a ``datasets.IterableDataset`` (no full download).
        image_column (`str`, *optional*) and label_column (`str`, *optional*):
            Column names; auto-detected when ``None`` (see :func:`resolve_image_columns`).
        cache_dir (`str`, *optional*):
            ``datasets`` cache folder.
        token (`str` or `bool`, *optional*):
            Hub token for gated/private datasets.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset` (when ``streaming``): with only the ``"image"`` column and,
        when labels exist, the ``"label"`` column. With neither ``dataset_name`` nor ``train_data_dir``: the
        embedded scikit-image photographs (:func:`load_default_image_dataset`).

    Raises:
        ValueError: ``train_data_dir`` does not exist, ``split`` is not ``"train"`` for a folder, or no image column
            is found.
    """
    if dataset_name is not None:
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir, token=token
        )
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"train_data_dir={train_data_dir!r} does not exist or is not a directory.")
        split_name = split.split("[", 1)[0]
        if split_name != FOLDER_SPLIT:
            raise ValueError(
                f"split={split!r}: a folder (train_data_dir) is one split, {FOLDER_SPLIT!r}, holding every image under "
                f"it whatever the file and folder names (slices such as '{FOLDER_SPLIT}[:100]' work); put other "
                "splits in folders of their own"
            )
        # data_dir= would let datasets infer splits from names: files or folders called test_*, valid_*, dev_*,
        # train_* or eval/ would become (or hide) splits, losing images. Explicit data_files make one split of all.
        dataset = datasets.load_dataset(
            "imagefolder",
            data_files={FOLDER_SPLIT: os.path.join(glob.escape(os.path.abspath(train_data_dir)), "**")},
            split=split,
            streaming=streaming,
            cache_dir=cache_dir,
        )
    else:
        dataset = load_default_image_dataset()
        if streaming:
            # One shard per image so that processes and DataLoader workers can split the stream by shard.
            dataset = dataset.to_iterable_dataset(num_shards=len(dataset))

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"split must name one split, got {split!r}; available splits: {list(dataset)}.")
    image_column, label_column = resolve_image_columns(dataset, image_column, label_column)
    kept_columns = [image_column] + ([label_column] if label_column is not None else [])
    if dataset.column_names is not None:
        dataset = dataset.select_columns(kept_columns)
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if label_column is not None and label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    return dataset


def prepare_columns(
    dataset: AnyDataset, image_column: str | None, label_column: str | None
) -> tuple[AnyDataset, str, str | None]:
    """Keep only the image/label columns, drop any output format and disable datasets' image decoding."""
    image_column, label_column = resolve_image_columns(dataset, image_column, label_column)
    dataset = dataset.with_format(None)
    if dataset.column_names is not None:
        dataset = dataset.select_columns([image_column] + ([label_column] if label_column is not None else []))
    if dataset.features is not None and isinstance(dataset.features.get(image_column), datasets.Image):
        # Same Arrow storage (struct<bytes, path>) as decode=True, so this is a metadata-only cast.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset, image_column, label_column


__all__ = [
    "DEFAULT_IMAGE_FILES",
    "DEMO_EXTRA_IMAGE_FILES",
    "DEMO_HELD_OUT_IMAGES",
    "FOLDER_SPLIT",
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "AnyDataset",
    "load_default_image_dataset",
    "load_demo_image_datasets",
    "load_image_dataset",
    "prepare_columns",
    "resolve_image_columns",
]
