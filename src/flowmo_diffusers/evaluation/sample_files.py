"""The files of `sample.py`: PNGs written atomically, the clean-up of an interrupted run, and the ADM-style `.npz`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from ..utils.files import atomic_write

#: How the temporary files of a write in progress begin: the next run deletes those a killed run left behind.
TEMPORARY_PREFIX = ".tmp-"


def save_image_atomically(image: PIL.Image.Image, path: os.PathLike | str) -> None:
    """Write `image` as PNG to `path` through a temporary file in the same folder and a rename.

    `os.replace` is atomic on POSIX and Windows, so `path` either does not exist or is complete.
    """
    path = Path(path)
    with atomic_write(path, prefix=f"{TEMPORARY_PREFIX}{path.stem}-") as file:
        image.save(file, format="PNG")


def remove_stale_temporary_files(folder: os.PathLike | str) -> int:
    """Delete temporary files that an interrupted run left behind; returns how many (call before sampling, holding
    the folder's lock: [`~flowmo_diffusers.utils.output_lock.lock_output_dir`])."""
    removed = 0
    for path in Path(folder).glob(f"{TEMPORARY_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def write_samples_npz(
    image_paths: Sequence[os.PathLike | str],
    npz_path: os.PathLike | str,
    class_labels: Sequence[int] | None = None,
) -> Path:
    """Pack images into an ADM-style `.npz` without holding them all in memory.

    The images are first written one by one into a memory-mapped `.npy` next to `npz_path`
    (`np.lib.format.open_memmap`), which `np.savez` then copies into the archive in chunks; the staging file is
    removed. So the archive is `np.savez`'s own (uncompressed, one `.npy` per array), read by `np.load` and ADM's
    evaluator, at the cost of the images' size in temporary disk space. Written to a temporary file and renamed.

    Args:
        image_paths (`Sequence[str | os.PathLike]`):
            Images in the desired order; all must have the same size.
        npz_path (`str` or `os.PathLike`):
            Output file.
        class_labels (`Sequence[int]`, *optional*):
            [N] labels, stored as `arr_1` (ADM's class-conditional samples do the same).

    Returns:
        `Path`: The written path. `arr_0` is `[N, H, W, 3]` uint8.
    """
    from ..utils.images import to_rgb as convert_to_rgb

    if not image_paths:
        raise ValueError("no images to pack")
    if class_labels is not None and len(class_labels) != len(image_paths):
        raise ValueError(f"got {len(class_labels)} class labels for {len(image_paths)} images")
    npz_path = Path(npz_path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    with PIL.Image.open(image_paths[0]) as first:
        width, height = first.size
    shape = (len(image_paths), height, width, 3)
    # The temporary prefix: a run killed while packing leaves a file that the next run's clean-up recognises.
    staging = npz_path.with_name(f"{TEMPORARY_PREFIX}{npz_path.stem}-arr_0.npy")
    try:
        images = np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint8, shape=shape)
        for index, path in enumerate(image_paths):
            with PIL.Image.open(path) as image:
                pixels = np.asarray(convert_to_rgb(image), dtype=np.uint8)
            if pixels.shape != shape[1:]:
                raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, the first image {width}x{height}")
            images[index] = pixels
        images.flush()
        arrays = {"arr_0": images}
        if class_labels is not None:
            arrays["arr_1"] = np.asarray(class_labels, dtype=np.int64)
        with atomic_write(npz_path, prefix=f"{TEMPORARY_PREFIX}{npz_path.stem}-") as file:
            np.savez(file, **arrays)
        del images, arrays  # close the memory map before its file goes
    finally:
        staging.unlink(missing_ok=True)
    return npz_path


__all__ = ["TEMPORARY_PREFIX", "remove_stale_temporary_files", "save_image_atomically", "write_samples_npz"]
