"""Pre-tokenization: encode an image dataset once with a FlowMo tokenizer into a `datasets` dataset of token ids.

The MaskGiT prior trains on token ids, not pixels; encoding ImageNet once (the encoder is deterministic) makes prior
training ~10x cheaper than encoding on the fly. Each image becomes one row:

* `indices`: the `num_indices` FlowMo ids of the center crop (`Sequence(int16)`, or int32 for codebooks above 2^15),
* `indices_flipped` (with `flip=True`): the ids of the horizontally flipped crop, so training can pick either
  per sample (TiTok's `random_flip` at the token level),
* `label`: the class id (-1 for unlabeled data), `index`: where the image came from (see below).

Work is split into chunks of `chunk_size` source rows, each written atomically (temporary file, then `os.replace`)
as `chunks/chunk-00000000.parquet`, `chunks/chunk-00000001.parquet` and so on. A chunk that exists is done, so a
restarted run (with any number of processes for map-style data) redoes at most the chunks that were in flight. Map-style chunk `c` covers rows
`[c * chunk_size, (c + 1) * chunk_size)` and belongs to process `c % num_processes`. A streaming dataset cannot be
indexed: each process takes its part of the stream (`split_dataset_by_node`) and its `k`-th chunk covers its stream
positions `[k * chunk_size, (k + 1) * chunk_size)`; resuming skips the finished positions, which requires the same
number of processes (recorded in `chunks/manifest.json` and checked).

Undecodable images are skipped and counted (per chunk in `chunks/chunk-<number>.json`), never fatal.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node

from ..data import AnyDataset, build_eval_dataloader, prepare_columns, resolve_image_columns
from ..metrics.codebook_statistics import CodebookStatistics
from ..models.autoencoder_flowmo import FlowMoModel
from ..utils.files import atomic_write
from ..utils.validation import check_int

logger = logging.getLogger(__name__)

CHUNKS_FOLDER = "chunks"
MANIFEST_NAME = "manifest.json"
TOKENIZATION_INFO_NAME = "tokenization.json"
#: Codebook usage, entropy and perplexity of the dataset's `indices` (docs/codebook-statistics.md), next to
#: `tokenization.json`.
CODEBOOK_STATISTICS_NAME = "codebook_statistics.json"
DATASET_FOLDER = "dataset"


@dataclass
class TokenizationInfo:
    """What a pre-tokenized dataset holds; saved as `tokenization.json` next to it and checked by the MaskGiT trainer.

    Attributes:
        tokenizer (`str`):
            The FlowMoPipeline folder or Hub id that encoded the images.
        num_indices (`int`) and codebook_size (`int`):
            Ids per image and their range `[0, codebook_size)`.
        resolution (`int`):
            Side of the center crop that was encoded.
        flip (`bool`):
            Whether `indices_flipped` exists.
        num_classes (`int`):
            Number of classes (from the dataset's `ClassLabel`, else max label + 1; 0 when unlabeled).
        streaming (`bool`):
            Whether the source was streamed (its `index` column is then `process + num_processes * position`).
        num_processes (`int`):
            Processes of the run that wrote the chunks (fixed for streaming sources).
        class_names (`list[str]`, *optional*):
            The class names of the source's `ClassLabel`, if it has one.
    """

    tokenizer: str
    num_indices: int
    codebook_size: int
    resolution: int
    flip: bool
    num_classes: int
    streaming: bool
    num_processes: int
    class_names: list[str] | None = None

    def save(self, path: str) -> None:
        _write_json_atomically(path, asdict(self))

    @classmethod
    def load(cls, path: str) -> TokenizationInfo:
        with open(path) as f:
            return cls(**json.load(f))


def _write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    with atomic_write(path) as file:
        file.write(json.dumps(payload, indent=2).encode())


def token_features(codebook_size: int, flip: bool) -> datasets.Features:
    """The columns of a pre-tokenized dataset (smallest signed integer type that holds the ids)."""
    id_type = "int16" if codebook_size <= 2**15 else "int32"
    features = {"indices": datasets.Sequence(datasets.Value(id_type))}
    if flip:
        features["indices_flipped"] = datasets.Sequence(datasets.Value(id_type))
    features.update(label=datasets.Value("int64"), index=datasets.Value("int64"))
    return datasets.Features(features)


def chunk_path(output_dir: str, chunk_name: str, suffix: str = "parquet") -> str:
    return os.path.join(output_dir, CHUNKS_FOLDER, f"{chunk_name}.{suffix}")


@torch.no_grad()
def encode_batch(
    autoencoder: FlowMoModel, pixels: torch.Tensor, flip: bool, autocast: Callable[[], AbstractContextManager]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of a batch `[b, 3, R, R]` in [-1, 1] (and of its mirror image when `flip`): `[b, num_indices]` each."""
    pixels = pixels.to(device=autoencoder.device, dtype=autoencoder.dtype)
    with autocast():
        indices = autoencoder.encode(pixels).indices
        flipped = autoencoder.encode(torch.flip(pixels, dims=[-1])).indices if flip else None
    return indices.cpu(), None if flipped is None else flipped.cpu()


def _write_chunk(output_dir, chunk_name, features, columns, num_skipped, num_rows_read) -> None:
    """Write one chunk: its statistics first, then the parquet file (by rename; its presence marks the chunk done)."""
    _write_json_atomically(
        chunk_path(output_dir, chunk_name, "json"),
        {"num_images": len(columns["label"]), "num_skipped": num_skipped, "num_rows_read": num_rows_read},
    )
    with atomic_write(chunk_path(output_dir, chunk_name)) as file:
        datasets.Dataset.from_dict(columns, features=features).to_parquet(file)


def _empty_columns(flip: bool) -> dict[str, list]:
    return {"indices": [], "label": [], "index": [], **({"indices_flipped": []} if flip else {})}


def _add_tokens(
    columns: dict[str, list], autoencoder, batch: dict[str, torch.Tensor], indices: torch.Tensor, flip, autocast
) -> None:
    """Encode one batch of the data package's evaluation loader; append its ids, labels and `indices` to `columns`."""
    ids, ids_flipped = encode_batch(autoencoder, batch["pixel_values"], flip, autocast)
    columns["indices"] += ids.tolist()
    if flip:
        columns["indices_flipped"] += ids_flipped.tolist()
    labels = batch.get("labels")
    columns["label"] += labels.tolist() if labels is not None else [-1] * len(ids)  # -1: unlabeled
    columns["index"] += indices.tolist()


def pretokenize(
    autoencoder: FlowMoModel,
    dataset: AnyDataset,
    output_dir: str,
    *,
    resolution: int | None = None,
    batch_size: int = 64,
    chunk_size: int = 10_000,
    flip: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    max_samples: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    show_progress: bool = True,
) -> dict[str, int]:
    """
    Encode this process's share of `dataset` into chunk files under `output_dir/chunks/` (see the module docstring).

    Images are read by the data package's evaluation loader ([`~flowmo_diffusers.data.build_eval_dataloader`]):
    center crops, and undecodable images logged, counted and left out.

    Args:
        autoencoder (`FlowMoModel`):
            The FlowMo tokenizer (eval mode, on the device to encode on).
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            Images with an image column (and optionally labels).
        output_dir (`str`):
            Where `chunks/` goes; existing chunks are kept (resume).
        resolution (`int`, *optional*):
            Crop side (default: the model's `sample_size`); shorter side resized, then center crop.
        batch_size (`int`, *optional*, defaults to `64`):
            Images per encoder call.
        chunk_size (`int`, *optional*, defaults to `10000`):
            Source rows per chunk file.
        flip (`bool`, *optional*, defaults to `False`):
            Also encode the horizontally flipped crop (`indices_flipped`).
        process_index (`int`, *optional*, defaults to `0`) and num_processes (`int`, *optional*, defaults to `1`):
            This process and the number of processes sharing the work.
        num_workers (`int`, *optional*, defaults to `0`):
            DataLoader workers decoding images (map-style data; a stream is decoded in the main process, in order).
        autocast (`Callable[[], AbstractContextManager]`, *optional*, defaults to `nullcontext`):
            Context manager factory for the encoder calls (e.g. `accelerator.autocast`).
        max_samples (`int`, *optional*):
            Only the first `max_samples` rows of the dataset (map-style) / of each process's stream.
        image_column (`str`, *optional*) and label_column (`str`, *optional*):
            Column names; auto-detected when `None`.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.

    Returns:
        `dict[str, int]`: `{"chunks_written", "chunks_skipped", "images", "skipped_images"}` for this process.
    """
    batch_size, chunk_size = check_int("batch_size", batch_size, 1), check_int("chunk_size", chunk_size, 1)
    process_index = check_int("process_index", process_index, 0, check_int("num_processes", num_processes, 1) - 1)
    resolution = resolution or autoencoder.config.sample_size
    features = token_features(autoencoder.codebook_size, flip)
    os.makedirs(os.path.join(output_dir, CHUNKS_FOLDER), exist_ok=True)
    dataset, image_column, label_column = prepare_columns(dataset, image_column, label_column)
    streaming = isinstance(dataset, datasets.IterableDataset)
    # The center crops of the evaluation loader; corrupt images are logged and counted there, never raised.
    loader_options = dict(
        resolution=resolution, batch_size=batch_size, num_workers=0 if streaming else num_workers,
        image_column=image_column, label_column=label_column,
    )
    summary = {"chunks_written": 0, "chunks_skipped": 0, "images": 0, "skipped_images": 0}

    def progress(iterable, total):
        if not show_progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=f"pre-tokenizing (process {process_index})", position=process_index)

    if not streaming:
        num_rows = len(dataset) if max_samples is None else min(max_samples, len(dataset))
        num_chunks = -(-num_rows // chunk_size)
        mine = list(range(process_index, num_chunks, num_processes))
        for chunk in progress(mine, len(mine)):
            name = f"chunk-{chunk:08d}"
            if os.path.exists(chunk_path(output_dir, name)):
                summary["chunks_skipped"] += 1
                continue
            start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, num_rows)
            loader = build_eval_dataloader(dataset.select(range(start, stop)), return_indices=True, **loader_options)
            columns = _empty_columns(flip)
            for batch in loader:
                _add_tokens(columns, autoencoder, batch, start + batch.pop("indices"), flip, autocast)
            skipped = loader.skipped_images.count
            _write_chunk(output_dir, name, features, columns, skipped, stop - start)
            summary["chunks_written"] += 1
            summary["images"] += len(columns["label"])
            summary["skipped_images"] += skipped
        return summary

    shard = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    done = 0
    while os.path.exists(chunk_path(output_dir, f"stream-{process_index:05d}-{done:08d}")):
        done += 1
    summary["chunks_skipped"] = done
    stream = shard.skip(done * chunk_size)
    if max_samples is not None:
        stream = stream.take(max(0, max_samples - done * chunk_size))
    # Positions in `stream` (undecodable rows included) say which chunk each image belongs to: chunk `done + k` holds
    # positions [k * chunk_size, (k + 1) * chunk_size). A chunk is written once an image of a later one arrives.
    loader = build_eval_dataloader(stream, return_indices=True, **loader_options)
    chunk, columns, images = 0, _empty_columns(flip), 0

    def finish(rows_read: int) -> None:
        name = f"stream-{process_index:05d}-{done + chunk:08d}"
        skipped = rows_read - len(columns["label"])
        _write_chunk(output_dir, name, features, columns, skipped, rows_read)
        summary["chunks_written"] += 1
        summary["images"] += len(columns["label"])
        summary["skipped_images"] += skipped

    for batch in progress(loader, None):
        positions = batch.pop("indices")
        for batch_chunk in torch.unique(positions // chunk_size).tolist():
            while chunk < batch_chunk:
                finish(chunk_size)
                chunk, columns = chunk + 1, _empty_columns(flip)
            part = positions // chunk_size == batch_chunk
            indices = process_index + num_processes * (done * chunk_size + positions[part])
            part_batch = {key: value[part] for key, value in batch.items()}
            _add_tokens(columns, autoencoder, part_batch, indices, flip, autocast)
        images += len(positions)
    # Rows after the last image were undecodable: they close the current chunk and fill any chunks after it.
    rows_left = images + loader.skipped_images.count - chunk * chunk_size
    while rows_left > 0:
        finish(min(rows_left, chunk_size))
        rows_left -= chunk_size
        chunk, columns = chunk + 1, _empty_columns(flip)
    return summary


def check_manifest(output_dir: str, settings: dict[str, Any]) -> None:
    """Record the run's settings in `chunks/manifest.json`, or check that a resumed run uses the same ones.

    Raises:
        ValueError: existing chunks were written with other settings (tokenizer, resolution, flip, chunk size, source,
            or, for streaming sources, the number of processes); mixing them would give an inconsistent dataset.
    """
    path = os.path.join(output_dir, CHUNKS_FOLDER, MANIFEST_NAME)
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        different = {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}
        if different:
            details = ", ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in different.items())
            raise ValueError(
                f"{output_dir} holds chunks written with other settings ({details}). Use a new --output_dir, or the "
                "same settings to resume."
            )
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json_atomically(path, settings)


def chunk_statistics(output_dir: str) -> dict[str, int]:
    """Totals over the chunks' statistics files: images, skipped images, rows read."""
    totals = {"num_images": 0, "num_skipped": 0, "num_rows_read": 0}
    for path in glob.glob(os.path.join(output_dir, CHUNKS_FOLDER, "*.json")):
        if os.path.basename(path) == MANIFEST_NAME:
            continue
        with open(path) as f:
            for key, value in json.load(f).items():
                totals[key] += value
    return totals


def assemble_token_dataset(output_dir: str, info: TokenizationInfo) -> datasets.Dataset:
    """Concatenate the chunks in order into one `datasets.Dataset` saved at `output_dir/dataset` (+ `tokenization.json`).

    Map-style sources come out in source order; streaming ones grouped by process. An `info.num_classes` of 0 (the
    source had no `ClassLabel`) is set here to the largest label + 1.
    """
    paths = sorted(glob.glob(os.path.join(output_dir, CHUNKS_FOLDER, "*.parquet")))
    if not paths:
        raise FileNotFoundError(f"no chunks in {os.path.join(output_dir, CHUNKS_FOLDER)}: nothing was tokenized")
    features = token_features(info.codebook_size, info.flip)
    # A chunk whose images were all undecodable is an empty file, which Dataset.from_parquet refuses to load.
    paths = [path for path in paths if pq.ParquetFile(path).metadata.num_rows]
    parts = [datasets.Dataset.from_parquet(path, features=features, keep_in_memory=True) for path in paths]
    dataset = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({}, features=features)
    if info.num_classes == 0 and len(dataset):
        info.num_classes = max(0, int(max(dataset["label"])) + 1)
    target = os.path.join(output_dir, DATASET_FOLDER)
    dataset.save_to_disk(target)
    info.save(os.path.join(target, TOKENIZATION_INFO_NAME))
    return datasets.load_from_disk(target)


def token_codebook_statistics(
    dataset: datasets.Dataset, info: TokenizationInfo, accelerator: Any | None = None, batch_size: int = 4096
) -> dict[str, float | int]:
    """Codebook statistics ([`~flowmo_diffusers.metrics.CodebookStatistics`]) of a token dataset's `indices` column.

    The flipped crops (`indices_flipped`) are an augmentation of the same images and are not counted. With an
    `accelerator`, each process counts its contiguous share of the rows and the counts are combined (call it on every
    process); rows are read `batch_size` at a time, so memory follows the batch, not the dataset.

    Returns:
        `dict`: the figures of [`~flowmo_diffusers.metrics.CodebookStatistics.compute`], on every process.

    Raises:
        ValueError: `info.codebook_size` is not a power of two (FlowMo ids always take `2**bits_per_subtoken` values).
    """
    size = info.codebook_size
    if size < 2 or size & (size - 1):
        raise ValueError(f"codebook_size must be a power of two for codebook statistics, got {size}")
    if accelerator is not None:
        dataset = dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    statistics = CodebookStatistics(bits_per_id=size.bit_length() - 1, num_positions=info.num_indices)
    for batch in dataset.select_columns(["indices"]).with_format("torch").iter(batch_size=batch_size):
        statistics.update(batch["indices"])
    return statistics.compute(accelerator)


def write_token_codebook_statistics(output_dir: str, accelerator: Any | None = None) -> dict[str, float | int] | None:
    """[`token_codebook_statistics`] of the assembled `output_dir/dataset`, saved beside its `tokenization.json` as
    `codebook_statistics.json` (by the main process). With an `accelerator`, call it on every process after
    [`assemble_token_dataset`]; without one (as `pretokenize.py` does, on the main process), one process counts all.

    Returns:
        `dict` or `None`: the figures, or `None` (and no file) when the dataset holds no image.
    """
    target = os.path.join(output_dir, DATASET_FOLDER)
    info = TokenizationInfo.load(os.path.join(target, TOKENIZATION_INFO_NAME))
    dataset = datasets.load_from_disk(target)
    if len(dataset) == 0:
        return None
    statistics = token_codebook_statistics(dataset, info, accelerator)
    if accelerator is None or accelerator.is_main_process:
        _write_json_atomically(os.path.join(target, CODEBOOK_STATISTICS_NAME), statistics)
    return statistics


def dataset_num_classes(dataset: AnyDataset, label_column: str | None = None) -> tuple[int, list[str] | None]:
    """(number of classes, class names) from a `ClassLabel` column; (0, None) when it cannot be told up front."""
    label_column = resolve_image_columns(dataset, None, label_column)[1]
    features = dataset.features or {}
    feature = features.get(label_column) if label_column else None
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes, list(feature.names)
    return 0, None


def load_token_dataset(
    path_or_repo_id: str, split: str = "train", **kwargs
) -> tuple[datasets.Dataset, TokenizationInfo | None]:
    """A pre-tokenized dataset from `pretokenize.py`'s output folder (or its `dataset/` folder) or a Hub dataset id.

    Returns:
        `(dataset, info)`; `info` is `None` for a Hub dataset without `tokenization.json`.
    """
    for folder in (os.path.join(path_or_repo_id, DATASET_FOLDER), path_or_repo_id):
        if os.path.isfile(os.path.join(folder, "dataset_info.json")) or os.path.isfile(os.path.join(folder, "state.json")):
            info_path = os.path.join(folder, TOKENIZATION_INFO_NAME)
            info = TokenizationInfo.load(info_path) if os.path.isfile(info_path) else None
            return datasets.load_from_disk(folder), info
    if os.path.isdir(path_or_repo_id):
        raise FileNotFoundError(
            f"{path_or_repo_id} is not a pre-tokenized dataset (no dataset/ folder from pretokenize.py and no "
            "datasets save_to_disk files)"
        )
    dataset = datasets.load_dataset(path_or_repo_id, split=split, **kwargs)
    info = None
    try:
        from huggingface_hub import hf_hub_download

        info_path = hf_hub_download(path_or_repo_id, TOKENIZATION_INFO_NAME, repo_type="dataset", token=kwargs.get("token"))
        info = TokenizationInfo.load(info_path)
    except Exception as error:  # noqa: BLE001 - missing file / offline: the trainer then checks the columns alone
        logger.info(f"No {TOKENIZATION_INFO_NAME} in {path_or_repo_id}: {error}")
    return dataset, info


def check_token_dataset(dataset: datasets.Dataset, num_indices: int, codebook_size: int, num_classes: int) -> None:
    """Raise ValueError unless `dataset` holds ids of the given format and labels in `[0, num_classes)`.

    Checks the columns, the length of the first row's ids and, over the whole dataset (one vectorized pass), the
    label range and the id range.
    """
    missing = {"indices", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"token dataset lacks the column(s) {sorted(missing)}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("token dataset is empty")
    id_columns = [column for column in ("indices", "indices_flipped") if column in dataset.column_names]
    low_label, high_label, low_id, high_id = None, None, None, None
    # In blocks: the whole ImageNet id table is gigabytes.
    for block in dataset.with_format("numpy").iter(batch_size=65_536):
        labels = block["label"]
        low_label = labels.min() if low_label is None else min(low_label, labels.min())
        high_label = labels.max() if high_label is None else max(high_label, labels.max())
        for column in id_columns:
            ids = block[column]
            if ids.ndim != 2 or ids.shape[1] != num_indices:
                raise ValueError(f"{column} must hold {num_indices} ids per image, got shape {ids.shape}")
            low_id = ids.min() if low_id is None else min(low_id, ids.min())
            high_id = ids.max() if high_id is None else max(high_id, ids.max())
    if low_label < 0 or high_label >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a class-conditional prior, got [{low_label}, {high_label}]"
            + (" (-1 marks unlabeled images)" if low_label == -1 else "")
        )
    if low_id < 0 or high_id >= codebook_size:
        raise ValueError(f"token ids must lie in [0, {codebook_size}), got [{low_id}, {high_id}]")

__all__ = [
    "CODEBOOK_STATISTICS_NAME",
    "TokenizationInfo",
    "assemble_token_dataset",
    "check_manifest",
    "check_token_dataset",
    "chunk_statistics",
    "dataset_num_classes",
    "encode_batch",
    "load_token_dataset",
    "pretokenize",
    "token_codebook_statistics",
    "token_features",
    "write_token_codebook_statistics",
]
