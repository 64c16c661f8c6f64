"""Exact resumption of the training loaders (flowmo_diffusers.data): a run interrupted after `cut` batches and resumed
from its JSON-saved state yields, bit for bit, the batches of the uninterrupted run; corrupt images are counted once
and training batches stay full. Offline, CPU, tiny generated PNGs."""

import io
import itertools
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_diffusers.data import build_eval_dataloader, build_train_dataloader

RESOLUTION = 16
CORRUPT_ROWS = (3, 9)


def make_dataset(num_rows, corrupt_rows=CORRUPT_ROWS):
    """Distinct random PNGs of varied sizes, label == row; the rows in `corrupt_rows` hold bytes no decoder reads."""
    rng = np.random.default_rng(0)
    images = []
    for row in range(num_rows):
        pixels = rng.integers(0, 256, (20 + row % 5, 24 + row % 7, 3), dtype=np.uint8)  # drawn for every row
        if row in corrupt_rows:
            images.append({"bytes": b"not an image", "path": f"corrupt-{row}.png"})
            continue
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": f"{row}.png"})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(num_rows))}, features=features)


def take(loader, num_batches):
    return list(itertools.islice(iter(loader), num_batches))


def assert_same_batches(expected, actual):
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert torch.equal(want["labels"], got["labels"])
        assert torch.equal(want["pixel_values"], got["pixel_values"])


def interrupted_run(build, num_batches, cut, resumed_build=None):
    """`cut` batches from one loader, the rest from a new one restored from the first one's state (through JSON)."""
    return interrupted_runs([build, resumed_build or build], [cut, num_batches - cut])


def interrupted_runs(builds, lengths):
    """`lengths[i]` batches from loader `builds[i]()`, each restored from the state of the one before (through JSON).

    Returns:
        The batches, the skipped images counted by all the loaders, and the last loader.
    """
    batches, skipped, state = [], 0, None
    for build, length in zip(builds, lengths):
        loader = build()
        if state is not None:
            loader.load_state_dict(state)
        batches += take(loader, length)
        skipped += loader.skipped_images.count
        state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint holds
    return batches, skipped, loader


@pytest.mark.parametrize("cut", [2, 4])  # mid-epoch 0; mid-epoch 1, after the epoch boundary
def test_map_style_resume_is_exact_whatever_the_number_of_workers(cut):
    dataset = make_dataset(12)  # 3 batches of 4 per epoch; 7 batches cover parts of three epochs
    options = dict(seed=3, random_flip=True)
    reference_loader = build_train_dataloader(dataset, RESOLUTION, 4, num_workers=0, **options)
    reference = take(reference_loader, 7)
    # Interrupted with 2 workers, resumed with none: a map-style batch depends only on its position.
    batches, skipped, resumed_loader = interrupted_run(
        lambda: build_train_dataloader(dataset, RESOLUTION, 4, num_workers=2, **options),
        7,
        cut,
        lambda: build_train_dataloader(dataset, RESOLUTION, 4, num_workers=0, **options),
    )
    assert_same_batches(reference, batches)
    assert resumed_loader.batches_consumed == 7 and resumed_loader.epoch == 2
    assert all(batch["pixel_values"].shape == (4, 3, RESOLUTION, RESOLUTION) for batch in batches)
    # Every epoch meets both corrupt rows once: counted once by the two runs together, as by the uninterrupted one.
    assert skipped == reference_loader.skipped_images.count >= 2 * len(CORRUPT_ROWS)
    # The corrupt rows were replaced by decodable ones: no batch holds their labels.
    assert not set(CORRUPT_ROWS) & {label for batch in batches for label in batch["labels"].tolist()}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 7])  # mid-epoch 0; in epoch 1
def test_streaming_resume_is_exact(num_workers, cut):
    # 4 shards: with 2 workers each reads 2 of them (8 rows), so an epoch has 6 or 7 batches of 2 in all.
    stream = make_dataset(16).to_iterable_dataset(num_shards=4)

    def build():
        return build_train_dataloader(
            stream, RESOLUTION, 2, seed=1, shuffle_buffer=4, num_workers=num_workers, random_flip=True
        )

    reference_loader = build()
    reference = take(reference_loader, 10)
    batches, skipped, resumed_loader = interrupted_run(build, 10, cut)
    assert_same_batches(reference, batches)
    assert resumed_loader.batches_consumed == 10 and resumed_loader.epoch == 1
    assert all(batch["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION) for batch in batches)
    assert skipped == reference_loader.skipped_images.count > 0
    epoch = [label for batch in take(build(), 7) for label in batch["labels"].tolist()]
    assert epoch != sorted(epoch)  # shuffled


def test_streaming_resume_survives_repeated_interruptions():
    """Saved again soon after a resume, a state holds workers that have not produced a batch since: their restored
    positions must be kept, not replaced by the start of the stream."""
    stream = make_dataset(16).to_iterable_dataset(num_shards=4)

    def build():
        return build_train_dataloader(stream, RESOLUTION, 2, seed=1, shuffle_buffer=4, num_workers=3)

    reference = take(build(), 12)
    batches, _, _ = interrupted_runs([build] * 5, [3, 1, 1, 2, 5])
    assert_same_batches(reference, batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_from_its_saved_position(num_workers):
    """The state holds each worker's position in its shards: the rows of the batches already used are not read again.
    Corrupting exactly those rows therefore leaves the rest of the epoch unchanged (reading up to the position again
    would count batches over other rows)."""
    options = dict(seed=2, shuffle_buffer=4, num_workers=num_workers)
    stream = make_dataset(16, corrupt_rows=()).to_iterable_dataset(num_shards=4)
    loader = build_train_dataloader(stream, RESOLUTION, 2, infinite=False, **options)
    epoch = list(loader)
    assert len(epoch) == 8
    interrupted = build_train_dataloader(stream, RESOLUTION, 2, infinite=False, **options)
    used = take(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))
    used_rows = {label for batch in used for label in batch["labels"].tolist()}
    altered = make_dataset(16, corrupt_rows=used_rows).to_iterable_dataset(num_shards=4)
    resumed = build_train_dataloader(altered, RESOLUTION, 2, infinite=False, **options)
    resumed.load_state_dict(state)
    assert_same_batches(epoch[3:], list(resumed))
    assert resumed.skipped_images.count == 0


def test_streaming_resume_between_epochs_and_after_a_finished_pass():
    stream = make_dataset(8, corrupt_rows=()).to_iterable_dataset(num_shards=2)

    def build():
        return build_train_dataloader(stream, RESOLUTION, 2, seed=0, shuffle_buffer=3, infinite=False)

    loader = build()
    first_epoch = list(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["epoch"] == 1 and state["dataloader"] is None  # between epochs: nothing to restore but the epoch
    resumed = build()
    resumed.load_state_dict(state)
    second_epoch = list(resumed)
    assert_same_batches(list(loader), second_epoch)
    firsts, seconds = (
        [label for batch in run for label in batch["labels"].tolist()]
        for run in (first_epoch, second_epoch)
    )
    assert sorted(firsts) == sorted(seconds) == list(range(8)) and firsts != seconds  # reshuffled every epoch


def test_streaming_state_needs_the_same_number_of_workers():
    stream = make_dataset(8, corrupt_rows=()).to_iterable_dataset(num_shards=2)
    loader = build_train_dataloader(stream, RESOLUTION, 2, seed=0, num_workers=2)
    take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers=2"):
        build_train_dataloader(stream, RESOLUTION, 2, seed=0, num_workers=0).load_state_dict(state)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loaders_leave_the_global_random_state_alone(streaming, num_workers):
    dataset = make_dataset(8)
    if streaming:
        dataset = dataset.to_iterable_dataset(num_shards=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    take(build_train_dataloader(dataset, RESOLUTION, 2, seed=0, random_flip=True, num_workers=num_workers), 5)
    list(build_eval_dataloader(dataset, RESOLUTION, 3, num_workers=num_workers))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("streaming", [False, True])
def test_eval_indices_name_the_rows_of_the_decodable_images(streaming):
    dataset = make_dataset(11)
    if streaming:
        dataset = dataset.to_iterable_dataset(num_shards=3)
    loader = build_eval_dataloader(dataset, RESOLUTION, 4, return_indices=True)
    batches = list(loader)
    indices = [index for batch in batches for index in batch["indices"].tolist()]
    assert indices == [row for row in range(11) if row not in CORRUPT_ROWS]
    assert [label for batch in batches for label in batch["labels"].tolist()] == indices  # label == row
    assert loader.skipped_images.count == len(CORRUPT_ROWS)
    with pytest.raises(ValueError, match="num_workers <= 1"):
        build_eval_dataloader(make_dataset(4).to_iterable_dataset(), RESOLUTION, 2, num_workers=2, return_indices=True)
