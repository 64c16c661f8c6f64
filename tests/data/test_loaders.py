"""Tests of the image data pipeline (flowmo_diffusers.data); offline, CPU, a few seconds."""

import io
import itertools

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_diffusers.data import (
    DEFAULT_IMAGE_FILES,
    DEMO_HELD_OUT_IMAGES,
    ImageTransform,
    build_eval_dataloader,
    build_train_dataloader,
    convert_to_rgb,
    load_demo_image_datasets,
    load_image_dataset,
)

RESOLUTION = 16


def take(loader, num_batches):
    return list(itertools.islice(iter(loader), num_batches))


def labels_of(batches):
    return [label for batch in batches for label in batch["labels"].tolist()]


def make_indexed_dataset(num_rows, seed=0):
    """Map-style dataset of distinct random RGB images of varied sizes; label == row index."""
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (20 + i % 5, 24 + i % 7, 3), dtype=np.uint8)) for i in range(num_rows)
    ]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(num_rows))}, features=features)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Class sub-folders holding 5 decodable images in unusual modes and 2 undecodable files."""
    root = tmp_path_factory.mktemp("image_folder")
    (root / "cats").mkdir()
    (root / "dogs").mkdir()
    rng = np.random.default_rng(0)
    # Grayscale (L) gradient.
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1)), mode="L").save(root / "cats" / "gray.png")
    # CMYK JPEG of solid magenta (C=0, M=255, Y=0, K=0 -> RGB (255, 0, 255)).
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(root / "cats" / "cmyk.jpg", quality=95)
    # 16-bit grayscale at mid range: must not be clipped to white.
    Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(root / "cats" / "sixteen_bit.png")
    # RGBA, red and fully transparent: composited over white.
    Image.new("RGBA", (30, 40), (255, 0, 0, 0)).save(root / "dogs" / "rgba.png")
    # Palette (P) image.
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert("P").save(root / "dogs" / "palette.png")
    # Undecodable: random bytes named .jpg, and a JPEG cut in half.
    (root / "dogs" / "corrupt.jpg").write_bytes(rng.bytes(2000))
    valid_jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(valid_jpeg, format="JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(valid_jpeg.getvalue()[: len(valid_jpeg.getvalue()) // 2])
    return root


def test_default_dataset_loads_offline_and_yields_normalized_batches():
    dataset = load_image_dataset()
    assert isinstance(dataset, datasets.Dataset)
    assert len(dataset) == len(DEFAULT_IMAGE_FILES)
    assert sorted(dataset["label"]) == list(range(len(DEFAULT_IMAGE_FILES)))
    loader = build_train_dataloader(dataset, RESOLUTION, batch_size=4, seed=0)
    for batch in take(loader, 3):
        assert batch["pixel_values"].shape == (4, 3, RESOLUTION, RESOLUTION)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (4,)
    assert loader.batches_consumed == 3 and loader.skipped_images.count == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_converts_modes_and_skips_corrupt_files(image_folder, tmp_path, num_workers):
    dataset = load_image_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path))
    assert dataset.features["label"].names == ["cats", "dogs"]  # labels from sub-folder names
    loader = build_eval_dataloader(dataset, RESOLUTION, batch_size=3, num_workers=num_workers)
    batches = list(loader)
    assert loader.skipped_images.count == 2 and loader.skipped_images.last_error
    pixel_values = torch.cat([batch["pixel_values"] for batch in batches])
    assert pixel_values.shape == (5, 3, RESOLUTION, RESOLUTION)

    paths = [value["path"] for value in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    undecodable = ("corrupt.jpg", "truncated.jpg")
    good = [(path, label) for path, label in zip(paths, dataset["label"]) if not path.endswith(undecodable)]
    by_name = {path.rsplit("/", 1)[-1]: image for (path, _), image in zip(good, pixel_values)}
    assert labels_of(batches) == [label for _, label in good]
    gray = by_name["gray.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.allclose(by_name["rgba.png"], torch.ones(3, RESOLUTION, RESOLUTION))  # transparent -> white
    magenta = by_name["cmyk.jpg"].mean(dim=(1, 2))
    assert magenta[0] > 0.9 and magenta[1] < -0.9 and magenta[2] > 0.9
    mid_gray = torch.full((3, RESOLUTION, RESOLUTION), 128 / 127.5 - 1)  # 32768 / 257 = 127.5 -> 128
    assert torch.allclose(by_name["sixteen_bit.png"], mid_gray, atol=1e-6)


def test_training_batches_stay_full_when_images_are_corrupt(image_folder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(image_folder), cache_dir=str(tmp_path))
    loader = build_train_dataloader(dataset, RESOLUTION, batch_size=3, seed=0, num_workers=2)
    batches = take(loader, 6)  # 3 epochs of 2 batches over 7 files
    assert all(batch["pixel_values"].shape == (3, 3, RESOLUTION, RESOLUTION) for batch in batches)
    assert loader.skipped_images.count > 0


def test_convert_to_rgb_handles_common_modes():
    for mode in ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1", "YCbCr"]:
        assert convert_to_rgb(Image.new(mode, (5, 4))).mode == "RGB"


def test_center_crop_is_deterministic_and_matches_manual_pil():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8))
    transform = ImageTransform(32, random_crop=False)
    output = transform(image)
    assert torch.equal(output, transform(image))
    # Manual: short side -> 32 (long side truncated like torchvision), PIL bilinear, centered box.
    new_width, new_height = int(32 * 97 / 61), 32
    resized = image.resize((new_width, new_height), Image.BILINEAR)
    left, top = int(round((new_width - 32) / 2)), int(round((new_height - 32) / 2))
    expected = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1
    assert torch.equal(output, torch.from_numpy(expected).permute(2, 0, 1))


def test_random_crop_is_reproducible_per_seed():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 200, 3), dtype=np.uint8))
    transform = ImageTransform(32, random_crop=True, random_flip=True)
    crops = [transform(image, generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(crops[0], crops[1])
    assert not torch.equal(crops[0], crops[2])

    dataset = make_indexed_dataset(8)
    runs = [take(build_train_dataloader(dataset, RESOLUTION, 4, seed=seed), 2) for seed in (5, 5, 6)]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(runs[0], runs[2]))


def test_random_crop_scale_zooms_into_reproducible_squares():
    # Left half dark, right half bright: a crop of a quarter of the side sees one half only, the whole image both.
    pixels = np.zeros((80, 120, 3), dtype=np.uint8)
    pixels[:, 60:] = 255
    image = Image.fromarray(pixels)
    whole = ImageTransform(16, random_crop=True, crop_scale=(1.0, 1.0))(image, generator=torch.Generator().manual_seed(0))
    assert whole.min() == -1 and whole.max() == 1  # an 80x80 square, resized: both halves
    zoom = ImageTransform(16, random_crop=True, crop_scale=(0.2, 0.25))
    crops = [zoom(image, generator=torch.Generator().manual_seed(seed)) for seed in range(12)]
    assert all(crop.shape == (3, 16, 16) and -1 <= crop.min() and crop.max() <= 1 for crop in crops)
    assert torch.equal(crops[0], zoom(image, generator=torch.Generator().manual_seed(0)))
    # A 16..20 pixel square lies inside one half unless it straddles x = 60; most of the dozen do not.
    assert sum(bool((crop == crop.flatten()[0]).all()) for crop in crops) >= 6
    # Never smaller than the output (no upsampling of a few pixels): a 2% crop of 80 px is taken at 16 px.
    tiny = ImageTransform(16, random_crop=True, crop_scale=(0.02, 0.02))(image, generator=torch.Generator().manual_seed(1))
    assert tiny.shape == (3, 16, 16)
    for bad, match in (((0.0, 1.0), "crop_scale"), ((0.5, 0.4), "crop_scale"), ((0.5,), "crop_scale"),
                       ((0.1, 1.5), "crop_scale")):
        with pytest.raises(ValueError, match=match):
            ImageTransform(16, random_crop=True, crop_scale=bad)
    with pytest.raises(ValueError, match="random_crop"):
        ImageTransform(16, random_crop=False, crop_scale=(0.5, 1.0))
    loader = build_train_dataloader(make_indexed_dataset(8), RESOLUTION, 4, seed=3, random_crop_scale=(0.3, 1.0))
    again = build_train_dataloader(make_indexed_dataset(8), RESOLUTION, 4, seed=3, random_crop_scale=(0.3, 1.0))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(take(loader, 2), take(again, 2)))


def test_demo_datasets_hold_the_held_out_photographs_out_of_training():
    training, held_out = load_demo_image_datasets()
    assert held_out.features["label"].names == list(DEMO_HELD_OUT_IMAGES)
    assert not set(training.features["label"].names) & set(DEMO_HELD_OUT_IMAGES)
    assert len(training) >= 16  # a full batch of the demo (16) from distinct photographs
    # The same pixels as the original files: only the encoding differs (uncompressed, fast to decode).
    original = load_image_dataset()
    names = original.features["label"].names
    chelsea = original.cast_column("image", datasets.Image())[names.index("chelsea")]["image"]
    assert np.array_equal(np.asarray(held_out[0]["image"]), np.asarray(chelsea.convert("RGB")))
    batch = next(iter(build_eval_dataloader(held_out, RESOLUTION, 2)))
    assert batch["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION) and batch["labels"].tolist() == [0, 1]


def test_map_style_split_across_two_processes_is_disjoint_and_complete():
    dataset = make_indexed_dataset(13)
    eval_labels = [
        labels_of(build_eval_dataloader(dataset, RESOLUTION, 4, process_index=rank, num_processes=2))
        for rank in range(2)
    ]
    assert not set(eval_labels[0]) & set(eval_labels[1])
    assert sorted(eval_labels[0] + eval_labels[1]) == list(range(13))
    assert eval_labels[0] == sorted(eval_labels[0])  # evaluation keeps dataset order

    # Training: 12 rows -> 6 per process = 2 batches of 3 per epoch; one epoch per process covers everything.
    train_labels = []
    for rank in range(2):
        loader = build_train_dataloader(
            make_indexed_dataset(12), RESOLUTION, 3, seed=0, process_index=rank, num_processes=2
        )
        assert loader.num_batches_per_epoch == 2
        train_labels.append(labels_of(take(loader, 2)))
    assert not set(train_labels[0]) & set(train_labels[1])
    assert sorted(train_labels[0] + train_labels[1]) == list(range(12))


@pytest.mark.parametrize("num_shards", [4, 3])  # 4: split by shards, 3: split by examples
def test_streaming_split_across_two_processes_is_disjoint_and_complete(num_shards):
    stream = make_indexed_dataset(12).to_iterable_dataset(num_shards=num_shards)
    eval_labels = [
        labels_of(build_eval_dataloader(stream, RESOLUTION, 4, process_index=rank, num_processes=2))
        for rank in range(2)
    ]
    assert not set(eval_labels[0]) & set(eval_labels[1])
    assert sorted(eval_labels[0] + eval_labels[1]) == list(range(12))

    train_labels = [
        labels_of(
            take(
                build_train_dataloader(
                    stream, RESOLUTION, 2, seed=0, process_index=rank, num_processes=2, shuffle_buffer=4
                ),
                3,
            )
        )
        for rank in range(2)
    ]
    assert not set(train_labels[0]) & set(train_labels[1])
    assert sorted(train_labels[0] + train_labels[1]) == list(range(12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_map_style_skip_batches_reproduces_following_batches(num_workers):
    dataset = make_indexed_dataset(12)  # 3 batches of 4 per epoch: batches 4..6 are in epochs 1 and 2
    full_run = take(build_train_dataloader(dataset, RESOLUTION, 4, seed=3, random_flip=True), 7)
    resumed_loader = build_train_dataloader(
        dataset, RESOLUTION, 4, seed=3, random_flip=True, skip_batches=4, num_workers=num_workers
    )
    resumed = take(resumed_loader, 3)
    for expected, actual in zip(full_run[4:], resumed):
        assert torch.equal(expected["labels"], actual["labels"])
        assert torch.equal(expected["pixel_values"], actual["pixel_values"])
    assert resumed_loader.batches_consumed == 7
    # Epochs are reshuffled: each epoch is a permutation of all rows, and not the same one.
    epochs = [labels_of(full_run[i : i + 3]) for i in (0, 3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12)) and epochs[0] != epochs[1]


def test_finite_iteration_yields_one_reshuffled_epoch_per_pass():
    loader = build_train_dataloader(make_indexed_dataset(8), RESOLUTION, 4, seed=0, infinite=False)
    first, second = labels_of(loader), labels_of(loader)
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    assert len(loader) == 2 and loader.batches_consumed == 4 and loader.epoch == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_skip_batches_reproduces_following_batches(num_workers):
    stream = make_indexed_dataset(16).to_iterable_dataset(num_shards=4)
    options = dict(seed=1, shuffle_buffer=4, num_workers=num_workers)
    full_run = take(build_train_dataloader(stream, RESOLUTION, 2, **options), 8)
    # Skipping an odd number of batches: with 2 workers the resumed run must start with worker 1's batch.
    resumed = take(build_train_dataloader(stream, RESOLUTION, 2, skip_batches=3, **options), 5)
    assert len(resumed) == 5
    for expected, actual in zip(full_run[3:], resumed):
        assert torch.equal(expected["labels"], actual["labels"])
        assert torch.equal(expected["pixel_values"], actual["pixel_values"])


def test_streaming_image_folder_end_to_end(image_folder, tmp_path):
    stream = load_image_dataset(train_data_dir=str(image_folder), streaming=True, cache_dir=str(tmp_path))
    assert isinstance(stream, datasets.IterableDataset)
    eval_loader = build_eval_dataloader(stream, RESOLUTION, batch_size=2)
    eval_batches = list(eval_loader)
    assert sum(len(batch["labels"]) for batch in eval_batches) == 5
    assert eval_loader.skipped_images.count == 2

    train_loader = build_train_dataloader(stream, RESOLUTION, batch_size=2, seed=0, shuffle_buffer=8)
    for batch in take(train_loader, 4):
        assert batch["pixel_values"].shape == (2, 3, RESOLUTION, RESOLUTION)
        assert batch["pixel_values"].abs().max() <= 1 and batch["labels"].dtype == torch.int64
    assert train_loader.skipped_images.count >= 2


def test_missing_image_column_and_missing_folder_raise_value_error(tmp_path):
    text_only = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"image column.*\['text', 'label'\]"):
        build_train_dataloader(text_only, RESOLUTION, 1, seed=0)
    with pytest.raises(ValueError, match="image column"):
        build_eval_dataloader(make_indexed_dataset(2), RESOLUTION, 1, image_column="pixels")
    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    from flowmo_diffusers.utils.files import atomic_write

    target = tmp_path / "sub" / "file.json"
    with atomic_write(target) as file:
        file.write(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError):
        with atomic_write(target, prefix=".partial-") as file:
            file.write(b"half of the second")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]  # no temporary file left
