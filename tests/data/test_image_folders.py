"""Image folders: every image is used whatever its name (no split inferred from test_*, valid_*, eval/ ...), for
training, evaluation and pre-tokenization alike; corrupt images are counted and the validation batch is filled from
later rows."""

import json

import numpy as np
import PIL.Image
import pytest

from flowmo_diffusers.data import build_eval_dataloader, load_image_dataset, take_images

from testing_utils import REPO, launch

SPLIT_LIKE_NAMES = ["test_", "valid_", "dev_", "train_", "eval/", "validation/", "test/", "train/x_", "dev/"]


def make_folder(root, class_folders):
    for index in range(25):
        if class_folders:
            folder = ["test", "valid_dogs", "train", "eval", "dev_birds"][index % 5]
            path = root / folder / f"{SPLIT_LIKE_NAMES[index % len(SPLIT_LIKE_NAMES)].replace('/', '_')}{index}.png"
        else:
            path = root / f"{SPLIT_LIKE_NAMES[index % len(SPLIT_LIKE_NAMES)]}{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((8, 8, 3), index * 10, np.uint8)).save(path)
    return root


@pytest.mark.parametrize("class_folders", [False, True])
@pytest.mark.parametrize("streaming", [False, True])
def test_every_image_is_used_whatever_its_name(tmp_path, class_folders, streaming):
    root = make_folder(tmp_path / "images", class_folders)
    dataset = load_image_dataset(train_data_dir=str(root), streaming=streaming, cache_dir=str(tmp_path / "cache"))
    loader = build_eval_dataloader(dataset, 8, 25)
    values = sorted(int(v) for batch in loader for v in ((batch["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round())
    assert values == [index * 10 for index in range(25)]  # 25 of 25
    if class_folders:
        assert dataset.features["label"].names == ["dev_birds", "eval", "test", "train", "valid_dogs"]


def test_a_folder_has_one_split_and_other_names_are_refused(tmp_path):
    root = make_folder(tmp_path / "images", class_folders=False)
    assert len(load_image_dataset(train_data_dir=str(root), split="train[:5]", cache_dir=str(tmp_path / "c"))) == 5
    with pytest.raises(ValueError, match="a folder \\(train_data_dir\\) is one split, 'train'"):
        load_image_dataset(train_data_dir=str(root), split="validation", cache_dir=str(tmp_path / "c"))


def test_validation_batch_is_filled_from_later_rows_when_the_first_files_are_corrupt(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for index in range(3):
        (root / f"a{index}.png").write_bytes(b"not an image")  # sorted first
    for index in range(6):
        PIL.Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(root / f"b{index}.png")
    loader = build_eval_dataloader(load_image_dataset(train_data_dir=str(root), cache_dir=str(tmp_path / "c")), 8, 4)
    batch = take_images(loader, 4)
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert loader.skipped_images.count == 3
    assert take_images(loader, 100)["pixel_values"].shape[0] == 6  # all there is
    with pytest.raises(ValueError, match="count must be positive"):
        take_images(loader, 0)


def test_training_counts_skipped_images_and_fills_the_validation_batch(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for index in range(3):
        (root / f"a{index}.png").write_bytes(b"not an image")  # the first rows: the validation batch's
    for index in range(4):
        PIL.Image.fromarray(np.full((40, 40, 3), 60 * index, np.uint8)).save(root / f"b{index}.png")
    output_dir = tmp_path / "run"
    log = launch(REPO / "examples" / "train_flowmo" / "train.py", [
        "--train_data_dir", root, "--model_config", "flowmo-tiny", "--max_train_steps", "3", "--train_batch_size", "2",
        "--num_validation_images", "2", "--validation_inference_steps", "1", "--validation_steps", "100",
        "--perceptual_weight", "0", "--report_to", "none", "--cache_dir", tmp_path / "cache", "--output_dir", output_dir,
    ])
    assert "Validation batch: 2 images" in log  # not 1: a2 and b0 shared the second batch of the first rows
    final = [json.loads(line) for line in (output_dir / "validation_metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["skipped_images"] > 0
    assert f"{final['skipped_images']} undecodable training images were skipped" in log
