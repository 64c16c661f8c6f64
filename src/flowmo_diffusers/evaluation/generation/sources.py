"""Where the generation evaluation's images come from: a samples folder, an `.npz` / `.npy` of samples, or a MaskGiT
pipeline sampling on the fly; each as batches `(global indices [b], images [b, 3, H, W] uint8)` of one process' share.
"""

from __future__ import annotations

import itertools
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sampling import batches_of_process, generate_batches, load_maskgit_pipeline, plan_samples, resolve_class_ids
from .config import GenerationEvaluationConfig

#: Image file suffixes read from a samples folder.
SAMPLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_sample_images(folder: os.PathLike | str) -> list[Path]:
    """Image files directly inside `folder` (hidden/temporary files excluded), sorted by name.

    Raises:
        FileNotFoundError: Not a folder. ValueError: No images in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder {str(folder)!r} does not exist")
    paths = sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in SAMPLE_IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )
    if not paths:
        raise ValueError(f"no images ({', '.join(SAMPLE_IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return paths


class NpzImageArray:
    """`arr_0` of an ADM-style `.npz`, or the array of a `.npy`: `[N, H, W, 3]` uint8 images.

    A `.npy` (e.g. `np.save(path, images)`) is memory-mapped (`np.load(..., mmap_mode="r")`: random access for any
    number of processes and workers, nothing read up front). An `.npz` is read through `np.load`, which cannot
    memory-map an archive member, so its images are held in memory (once per process, and per DataLoader worker
    started with "spawn"); for large sets evaluate the samples folder or a `.npy`.

    Args:
        path (`str`):
            The `.npz` or `.npy` file.
        shape (`tuple[int, ...]`):
            `(N, H, W, 3)`.
        images (`np.ndarray`, *optional*):
            The images already read (by [`locate_npz_images`]); None: read on the first [`open`].
    """

    def __init__(self, path: str, shape: tuple[int, ...], images: np.ndarray | None = None):
        self.path, self.shape, self.images = path, shape, images

    def open(self) -> np.ndarray:
        """The `[N, H, W, 3]` uint8 images (memory-mapped for a `.npy`)."""
        if self.images is not None:
            return self.images
        return _read_image_array(self.path)

    def __getstate__(self) -> dict[str, Any]:
        # Workers started with "spawn" receive the location, not a copy of the images (or a memory map).
        return dict(self.__dict__, images=None)


def _read_image_array(path: str) -> np.ndarray:
    """The images of the `.npy` (memory-mapped) or `.npz` (`arr_0`, read) at `path`, whatever its suffix says."""
    try:
        # mmap_mode applies to a .npy only; an archive comes back as an NpzFile whatever it is.
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r} is not an .npz archive or a .npy array: {error}") from error
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as archive:
        if "arr_0" not in archive.files:
            hint = ""
            if "mu" in archive.files:
                hint = " (these look like reference statistics; pass them as --reference_statistics)"
            entries = [f"{name}.npy" for name in archive.files]
            raise ValueError(f"{path!r} has no `arr_0` images (entries: {entries}){hint}")
        return archive["arr_0"]


def locate_npz_images(path: os.PathLike | str) -> NpzImageArray:
    """Open the images of an ADM-style `.npz` (`arr_0`) or of a `.npy`, and check that they are images.

    Raises:
        FileNotFoundError / ValueError: Missing file, no `arr_0`, or not `[N, H, W, 3]` uint8.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file {path!r} does not exist")
    images = _read_image_array(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"`arr_0` of {path!r} must be [N, H, W, 3] uint8 (ADM's sample format), got {images.shape} {images.dtype}"
        )
    shape = tuple(int(size) for size in images.shape)
    # A memory map is reopened where it is read; images read from an archive are kept, not read twice.
    return NpzImageArray(path, shape, None if isinstance(images, np.memmap) else images)


class SampleImages(torch.utils.data.Dataset):
    """One process' share of a samples folder, `.npz` or `.npy`: items `(global index, [3, H, W] uint8 tensor)`.

    Args:
        source (`list[Path]` or [`NpzImageArray`]):
            Sorted image paths ([`list_sample_images`]) or the images of an `.npz` / `.npy`.
        process_index (`int`, *optional*, defaults to `0`):
            This process, `p`: it takes the global indices `i` with `i % P == p`.
        num_processes (`int`, *optional*, defaults to `1`):
            `P`.
        max_samples (`int`, *optional*):
            Only the first `max_samples` images of the whole set.
    """

    def __init__(self, source, process_index: int = 0, num_processes: int = 1, max_samples: int | None = None):
        self.source = source
        total = source.shape[0] if isinstance(source, NpzImageArray) else len(source)
        self.num_total = min(total, max_samples) if max_samples is not None else total
        self.indices = list(range(process_index, self.num_total, num_processes))
        self._array: np.ndarray | None = None  # opened lazily, in each DataLoader worker

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        from ...utils.images import to_rgb as convert_to_rgb

        index = self.indices[position]
        if isinstance(self.source, NpzImageArray):
            if self._array is None:
                self._array = self.source.open()
            pixels = np.array(self._array[index])
        else:
            import PIL.Image

            with PIL.Image.open(self.source[index]) as image:
                pixels = np.array(convert_to_rgb(image), dtype=np.uint8)  # a writable copy, as torch wants
        return index, torch.from_numpy(pixels).permute(2, 0, 1)

    def __getstate__(self) -> dict[str, Any]:
        # Workers started with "spawn" receive the dataset pickled: send the location, not a memory map.
        return dict(self.__dict__, _array=None)

    def name_of(self, index: int) -> str:
        if isinstance(self.source, NpzImageArray):
            return f"{self.source.path}[{index}]"
        return str(self.source[index])


class _CollateSamples:
    def __init__(self, dataset: SampleImages):
        self.dataset = dataset

    def __call__(self, items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.tensor([index for index, _ in items], dtype=torch.int64)
        shapes = {tuple(image.shape) for _, image in items}
        if len(shapes) > 1:
            first_index, first = items[0]
            other_index, other = next((i, image) for i, image in items if image.shape != first.shape)
            raise ValueError(
                f"samples must all have the same size: {self.dataset.name_of(first_index)} is "
                f"{tuple(first.shape[1:])}, {self.dataset.name_of(other_index)} is {tuple(other.shape[1:])}"
            )
        return indices, torch.stack([image for _, image in items])


def sample_file_batches(
    samples: os.PathLike | str,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    max_samples: int | None = None,
    skip_batches: int = 0,
) -> tuple[torch.utils.data.DataLoader, int]:
    """Batches `(global indices [b], images [b, 3, H, W] uint8)` of this process' share of a folder, `.npz` or `.npy`.

    Args:
        skip_batches (`int`, *optional*, defaults to `0`):
            This process' first batches to leave out (resuming): they are not read at all, and the batches that follow
            are composed as in a run that starts at the beginning.

    Returns:
        The loader and the total number of images (all processes).
    """
    if os.path.isdir(samples):
        source = list_sample_images(samples)
    else:
        source = locate_npz_images(samples)
    dataset = SampleImages(source, process_index, num_processes, max_samples)
    remaining = torch.utils.data.Subset(dataset, range(min(skip_batches * batch_size, len(dataset)), len(dataset)))
    loader = torch.utils.data.DataLoader(
        remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_CollateSamples(dataset)
    )
    return loader, dataset.num_total


def pipeline_sample_batches(
    config: GenerationEvaluationConfig, accelerator, skip_batches: int = 0
) -> tuple[Iterator, int, dict[str, Any]]:
    """Generate `sample.py`'s images of `config` (this process' share) as metric batches.

    Args:
        skip_batches (`int`, *optional*, defaults to `0`):
            This process' first batches to leave out (resuming). Every image has its own generator, seeded by `(seed,
            class, index in class)`, so the remaining images are those of an uninterrupted run: there is no generator
            state to restore.

    Returns:
        `tuple[Iterator, int, dict]`: Batches of `(global indices [b], images [b, 3, H, W] uint8)`, the total number
        of images, and the sampling settings.
    """
    pipeline = load_maskgit_pipeline(config, accelerator)
    class_ids = resolve_class_ids(config.class_ids, pipeline.transformer.config.num_classes)
    plan = plan_samples(class_ids, config.num_images_per_class)
    if config.max_samples is not None:
        plan = plan[: config.max_samples]
    my_batches = batches_of_process(plan, config.batch_size, accelerator.process_index, accelerator.num_processes)
    my_batches = itertools.islice(my_batches, skip_batches, None)
    generated = generate_batches(pipeline, my_batches, config, autocast=accelerator.autocast)

    def to_tensors():
        for specs, images in generated:
            pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # [b, H, W, 3]
            yield torch.tensor([spec.global_index for spec in specs]), torch.from_numpy(pixels).permute(0, 3, 1, 2)

    settings = {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "revision": config.revision,
        "num_classes": len(class_ids),
        "num_images_per_class": config.num_images_per_class,
        "seed": config.seed,
        **config.pipeline_arguments(),
        "mixed_precision": accelerator.mixed_precision,
    }
    return to_tensors(), len(plan), settings



__all__ = [
    "SAMPLE_IMAGE_SUFFIXES",
    "NpzImageArray",
    "SampleImages",
    "list_sample_images",
    "locate_npz_images",
    "pipeline_sample_batches",
    "sample_file_batches",
]
