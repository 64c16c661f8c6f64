"""Pre-tokenization (`flowmo_diffusers.training.pretokenize`, examples/train_maskgit/pretokenize.py) and MaskGiT
training (examples/train_maskgit/train.py): tiny end to end on CPU through `accelerate launch`, exact resume, errors."""

import json
import os

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from flowmo_diffusers import FlowMoMaskGiTPipeline, FlowMoPipeline
from flowmo_diffusers.data import ImageTransform, load_default_image_dataset
from flowmo_diffusers.training.pretokenize import (
    CODEBOOK_STATISTICS_NAME,
    TokenizationInfo,
    assemble_token_dataset,
    check_manifest,
    check_token_dataset,
    chunk_statistics,
    load_token_dataset,
    pretokenize,
    token_codebook_statistics,
    write_token_codebook_statistics,
)

from testing_utils import EXAMPLES, launch, tiny_flowmo_model, tiny_flowmo_pipeline

PRETOKENIZE, TRAIN = EXAMPLES / "train_maskgit" / "pretokenize.py", EXAMPLES / "train_maskgit" / "train.py"
TINY_TRAIN = [
    "--model_config", "maskgit-tiny", "--train_batch_size", "4", "--lr_warmup_steps", "2", "--learning_rate", "1e-3",
    "--dataloader_num_workers", "0", "--validation_inference_steps", "4", "--validation_decoder_inference_steps", "2",
    "--report_to", "none", "--seed", "0",
]


def expected_ids(autoencoder, dataset, flip=False):
    transform = ImageTransform(autoencoder.config.sample_size, random_crop=False)
    pixels = torch.stack([transform(image) for image in dataset["image"]])
    if flip:
        pixels = torch.flip(pixels, dims=[-1])
    with torch.no_grad():
        return autoencoder.encode(pixels).indices


def test_pretokenize_matches_direct_encoding_and_resumes(tiny_model, tmp_path):
    photos = load_default_image_dataset()
    summary = pretokenize(tiny_model, photos, str(tmp_path), batch_size=2, chunk_size=4, flip=True, show_progress=False)
    assert summary == {"chunks_written": 3, "chunks_skipped": 0, "images": 9, "skipped_images": 0}
    info = TokenizationInfo(tokenizer="tiny", num_indices=24, codebook_size=16, resolution=32, flip=True,
                            num_classes=9, streaming=False, num_processes=1)
    tokens = assemble_token_dataset(str(tmp_path), info)
    assert tokens.features["indices"].feature.dtype == "int16"
    assert torch.equal(torch.tensor(tokens["indices"]), expected_ids(tiny_model, photos))
    assert torch.equal(torch.tensor(tokens["indices_flipped"]), expected_ids(tiny_model, photos, flip=True))
    assert tokens["label"] == photos["label"] and tokens["index"] == list(range(9))
    # Codebook statistics of `indices` (not the flipped crops) beside tokenization.json, as numpy computes them.
    assert write_token_codebook_statistics(str(tmp_path)) == json.loads(
        (tmp_path / "dataset" / CODEBOOK_STATISTICS_NAME).read_text())
    statistics = json.loads((tmp_path / "dataset" / CODEBOOK_STATISTICS_NAME).read_text())
    ids = np.asarray(tokens["indices"])
    counts = np.bincount(ids.ravel(), minlength=16)
    probabilities = counts[counts > 0] / ids.size
    assert statistics["codebook_usage"] == np.count_nonzero(counts) / 16
    assert statistics["codebook_usage_per_position_min"] == min(len(np.unique(column)) for column in ids.T) / 16
    assert statistics["codebook_entropy_bits"] == pytest.approx(-(probabilities * np.log2(probabilities)).sum())
    assert statistics["codebook_num_ids"] == 9 * 24 and statistics["codebook_bits_per_id"] == 4

    # Resume: only the missing chunk is redone; the same work split over 2 processes gives the same chunks.
    middle = tmp_path / "chunks" / "chunk-00000001.parquet"
    before = middle.read_bytes()
    middle.unlink()
    summary = pretokenize(tiny_model, photos, str(tmp_path), batch_size=3, chunk_size=4, flip=True, show_progress=False)
    assert summary["chunks_written"] == 1 and summary["chunks_skipped"] == 2
    (tmp_path / "before.parquet").write_bytes(before)
    redone, original = (datasets.Dataset.from_parquet(str(path)) for path in (middle, tmp_path / "before.parquet"))
    assert redone.to_dict() == original.to_dict()
    split_dir = tmp_path / "two_processes"
    for rank in range(2):
        pretokenize(tiny_model, photos, str(split_dir), batch_size=2, chunk_size=4, flip=True, process_index=rank,
                    num_processes=2, show_progress=False)
    split_tokens = assemble_token_dataset(str(split_dir), info)
    assert split_tokens["indices"] == tokens["indices"] and split_tokens["label"] == tokens["label"]
    loaded, loaded_info = load_token_dataset(str(tmp_path))
    assert loaded_info == info and loaded["indices"] == tokens["indices"]


def test_pretokenize_streaming_skips_corrupt_images(tiny_model, tmp_path):
    photos = load_default_image_dataset().cast_column("image", datasets.Image(decode=False))
    rows = photos.to_list()
    rows[2]["image"] = {"bytes": b"not an image", "path": "broken.png"}
    broken = datasets.Dataset.from_list(rows, features=photos.features).cast_column("image", datasets.Image())
    stream = broken.to_iterable_dataset(num_shards=3)
    summary = pretokenize(tiny_model, stream, str(tmp_path), batch_size=4, chunk_size=5, show_progress=False)
    assert summary["images"] == 8 and summary["skipped_images"] == 1
    assert chunk_statistics(str(tmp_path)) == {"num_images": 8, "num_skipped": 1, "num_rows_read": 9}
    # num_classes 0 (no ClassLabel known up front, as for a stream): set from the largest label at assembly.
    info = TokenizationInfo(tokenizer="tiny", num_indices=24, codebook_size=16, resolution=32, flip=False,
                            num_classes=0, streaming=True, num_processes=1)
    tokens = assemble_token_dataset(str(tmp_path), info)
    assert info.num_classes == 9 and load_token_dataset(str(tmp_path))[1].num_classes == 9
    good = [i for i in range(9) if i != 2]
    reference = expected_ids(tiny_model, load_default_image_dataset().select(good))
    assert tokens["index"] == good and torch.equal(torch.tensor(tokens["indices"]), reference)
    assert "indices_flipped" not in tokens.column_names
    # Streaming resume picks up after the finished chunks of this process.
    (tmp_path / "chunks" / "stream-00000-00000001.parquet").unlink()
    summary = pretokenize(tiny_model, stream, str(tmp_path), batch_size=4, chunk_size=5, show_progress=False)
    assert summary == {"chunks_written": 1, "chunks_skipped": 1, "images": 4, "skipped_images": 0}


@pytest.mark.parametrize("corrupt", [(3, 4, 5, 8), (1, 6, 7, 8)])  # a whole chunk in the middle; at the end
def test_pretokenize_streaming_writes_chunks_whose_rows_are_all_undecodable(tiny_model, tmp_path, corrupt):
    photos = load_default_image_dataset().cast_column("image", datasets.Image(decode=False))
    rows = photos.to_list()
    for row in corrupt:
        rows[row]["image"] = {"bytes": b"not an image", "path": f"broken-{row}.png"}
    broken = datasets.Dataset.from_list(rows, features=photos.features).cast_column("image", datasets.Image())
    summary = pretokenize(tiny_model, broken.to_iterable_dataset(num_shards=3), str(tmp_path), batch_size=2,
                          chunk_size=3, show_progress=False)
    assert summary == {"chunks_written": 3, "chunks_skipped": 0, "images": 9 - len(corrupt),
                       "skipped_images": len(corrupt)}
    for chunk in range(3):  # chunk c holds stream positions 3c, 3c + 1, 3c + 2
        statistics = json.loads((tmp_path / "chunks" / f"stream-00000-{chunk:08d}.json").read_text())
        skipped = sum(3 * chunk <= row < 3 * chunk + 3 for row in corrupt)
        assert statistics == {"num_images": 3 - skipped, "num_skipped": skipped, "num_rows_read": 3}
        chunk_tokens = pq.read_table(tmp_path / "chunks" / f"stream-00000-{chunk:08d}.parquet").to_pydict()
        assert chunk_tokens["index"] == [row for row in range(3 * chunk, 3 * chunk + 3) if row not in corrupt]
    info = TokenizationInfo(tokenizer="tiny", num_indices=24, codebook_size=16, resolution=32, flip=False,
                            num_classes=9, streaming=True, num_processes=1)
    tokens = assemble_token_dataset(str(tmp_path), info)  # empty chunks included
    assert tokens["index"] == [row for row in range(9) if row not in corrupt]


def test_token_codebook_statistics_needs_a_power_of_two_codebook():
    info = TokenizationInfo(tokenizer="tiny", num_indices=2, codebook_size=12, resolution=32, flip=False,
                            num_classes=0, streaming=False, num_processes=1)
    tokens = datasets.Dataset.from_dict({"indices": [[0, 11]]})
    with pytest.raises(ValueError, match="codebook_size must be a power of two for codebook statistics, got 12"):
        token_codebook_statistics(tokens, info)


def test_manifest_refuses_other_settings(tmp_path):
    check_manifest(str(tmp_path), {"tokenizer": "a", "flip": True})
    check_manifest(str(tmp_path), {"tokenizer": "a", "flip": True})
    with pytest.raises(ValueError, match="flip: True then, False now"):
        check_manifest(str(tmp_path), {"tokenizer": "a", "flip": False})


def test_check_token_dataset_errors():
    good = datasets.Dataset.from_dict({"indices": [[1, 2, 3]] * 2, "label": [0, 1]})
    check_token_dataset(good, num_indices=3, codebook_size=4, num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*unlabeled"):
        check_token_dataset(good.map(lambda row: {"label": -1}), 3, 4, 2)
    with pytest.raises(ValueError, match="must hold 4 ids per image"):
        check_token_dataset(good, num_indices=4, codebook_size=4, num_classes=2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 3\)"):
        check_token_dataset(good, num_indices=3, codebook_size=3, num_classes=2)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\]"):
        check_token_dataset(good.remove_columns("label"), 3, 4, 2)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A tiny tokenizer and the embedded photographs pre-tokenized by the script (2 processes, with flips)."""
    root = tmp_path_factory.mktemp("maskgit")
    tiny_flowmo_pipeline(tiny_flowmo_model()).save_pretrained(root / "tokenizer")
    launch(PRETOKENIZE, ["--pretrained_model_name_or_path", root / "tokenizer", "--output_dir", root / "tokens",
                         "--flip", "--chunk_size", "4", "--batch_size", "4", "--dataloader_num_workers", "0"],
           num_processes=2)
    return root


def test_end_to_end_pretokenize_train_resume_sample(tokenized, tmp_path):
    tokens, info = load_token_dataset(str(tokenized / "tokens"))
    # Counted by 2 processes (a share each, combined), the same figures as one process counting everything.
    statistics = json.loads((tokenized / "tokens" / "dataset" / CODEBOOK_STATISTICS_NAME).read_text())
    assert statistics == token_codebook_statistics(tokens, info) and statistics["codebook_num_ids"] == 9 * 24
    assert len(tokens) == 9 and info.flip and info.num_classes == 9 and info.class_names[0] == "astronaut"
    assert info.num_processes == 2 and tokens["index"] == list(range(9))  # chunks 0 and 2 by rank 0, 1 by rank 1
    photos = load_default_image_dataset()
    autoencoder = FlowMoPipeline.from_pretrained(tokenized / "tokenizer").autoencoder
    assert torch.equal(torch.tensor(tokens["indices"]), expected_ids(autoencoder, photos))
    common = TINY_TRAIN + ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--train_dataset",
                           tokenized / "tokens", "--max_train_steps", "8", "--use_ema", "--checkpointing_steps", "3",
                           "--validation_steps", "4"]
    # 9 sequences, batches of 4: 2 batches per epoch, so the step-3 checkpoint sits in the middle of an epoch.
    launch(TRAIN, common + ["--output_dir", tmp_path / "full"])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.rename(tmp_path / "full" / "checkpoint-3", resumed / "checkpoint-3")
    (tmp_path / "full" / "checkpoint-3").mkdir()  # keep the reference run's folder listing intact
    log = launch(TRAIN, common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in log
    for name in ("checkpoint-6/model.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        full, again = load_file(tmp_path / "full" / name), load_file(resumed / name)
        assert all(torch.equal(full[key], again[key]) for key in full), name

    run = tmp_path / "full"
    assert (run / "samples.png").is_file() and (run / "validation" / "step-00000004.png").is_file()
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["ema"] and np.isfinite(summary["final_loss"])
    pipeline = FlowMoMaskGiTPipeline.from_pretrained(run)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.transformer.config.num_classes == 9 and pipeline.transformer.config.num_indices == 24
    output = pipeline([0, 8], num_inference_steps=4, decoder_num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0))
    assert output.images.shape == (2, 32, 32, 3) and output.indices.shape == (2, 24)
    assert output.indices.min() >= 0 and output.indices.max() < 16
    assert np.isfinite(output.images).all() and 0 <= output.images.min() and output.images.max() <= 1


def test_training_learns_the_token_data(tokenized, tmp_path):
    """300 steps on the 9 sequences (one per class) learn them: masked-token accuracy 0.935 measured, against 0.727 for
    the best class-blind guess (each position's most frequent id; the random tiny tokenizer's ids are far from
    uniform). The test asserts a margin of 0.1 over that baseline."""
    launch(TRAIN, TINY_TRAIN + ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--train_dataset",
                                tokenized / "tokens", "--max_train_steps", "300", "--validation_steps", "1000",
                                "--checkpointing_steps", "1000", "--no_flip", "--output_dir", tmp_path])
    transformer = FlowMoMaskGiTPipeline.from_pretrained(tmp_path).transformer.eval()
    tokens, _ = load_token_dataset(str(tokenized / "tokens"))
    ids = torch.tensor(tokens["indices"], dtype=torch.long)
    labels = torch.tensor(tokens["label"])
    # Half of each sequence masked, at fixed positions; predict it from the other half and the class.
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad():
        logits = transformer(ids.masked_fill(mask, transformer.mask_token_id), labels).logits
    accuracy = (logits.argmax(-1) == ids)[mask].float().mean().item()
    masked_columns = ids[:, mask[0]].numpy()
    baseline = np.mean([np.bincount(column).max() / len(column) for column in masked_columns.T])
    print(f"masked-token accuracy after 300 steps: {accuracy:.3f} (per-position majority baseline {baseline:.3f})")
    assert accuracy > baseline + 0.1, (accuracy, baseline)


def test_training_refuses_unlabeled_tokens(tokenized, tmp_path):
    tokens, info = load_token_dataset(str(tokenized / "tokens"))
    tokens.map(lambda row: {"label": -1}).save_to_disk(tmp_path / "unlabeled")
    with pytest.raises(AssertionError, match=r"labels must lie in \[0, 10\).*unlabeled"):
        launch(TRAIN, TINY_TRAIN + ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--train_dataset",
                                    tmp_path / "unlabeled", "--max_train_steps", "1", "--output_dir", tmp_path / "out"])



def test_two_process_training(tokenized, tmp_path):
    """DDP on 2 CPU processes (gloo): the wrapped transformer trains and the saved pipeline samples."""
    launch(TRAIN, TINY_TRAIN + ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--train_dataset",
                                tokenized / "tokens", "--max_train_steps", "4", "--train_batch_size", "2",
                                "--validation_steps", "1000", "--checkpointing_steps", "1000", "--output_dir", tmp_path],
           num_processes=2)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and np.isfinite(summary["final_loss"])
    pipeline = FlowMoMaskGiTPipeline.from_pretrained(tmp_path)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline([1], num_inference_steps=2, output_type="latent").images.shape == (1, 24)


def test_pretokenize_pushes_to_the_hub_and_training_reads_it_back(tokenized, tmp_path):
    """`pretokenize.py --push_to_hub` (datasets' push_to_hub: parquet shards through LFS, plus tokenization.json), then
    `--train_dataset` as that Hub dataset id, through the local Hub stand-in."""
    from hub_stub import LocalHub

    with LocalHub() as hub:
        env = hub.client_env(tmp_path / "hf_home")
        launch(PRETOKENIZE, ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--output_dir",
                             tmp_path / "tokens", "--flip", "--batch_size", "4", "--dataloader_num_workers", "0",
                             "--push_to_hub", "--hub_dataset_id", "user/tiny-tokens", "--hub_token", "dummy"], env=env)
        pushed = hub.repo_files("user/tiny-tokens", repo_type="dataset")
        shards = [path for path in pushed if path.endswith(".parquet")]
        assert len(shards) == 1 and shards[0].startswith("data/train-")
        assert any("/lfs-objects/" in path for path in hub.request_paths("PUT"))
        for name in ("tokenization.json", CODEBOOK_STATISTICS_NAME):
            assert pushed[name] == (tmp_path / "tokens" / "dataset" / name).read_bytes()
        (tmp_path / "shard.parquet").write_bytes(pushed[shards[0]])
        local, _ = load_token_dataset(str(tokenized / "tokens"))
        assert datasets.Dataset.from_parquet(str(tmp_path / "shard.parquet")).to_dict() == local.to_dict()

        log = launch(TRAIN, TINY_TRAIN + ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--train_dataset",
                                          "user/tiny-tokens", "--max_train_steps", "2", "--validation_steps", "1000",
                                          "--output_dir", tmp_path / "out"], env=env)
        assert not hub.unhandled
    assert "9 sequences of 24 ids < 16, 9 classes, flip augmentation: True" in log
    assert FlowMoMaskGiTPipeline.from_pretrained(tmp_path / "out").transformer.config.num_classes == 9


def test_diverged_training_stops_before_checkpointing_the_bad_step(tokenized, tmp_path):
    """lr 1e30: step 1 is finite and saved; every later step is non-finite: 3 are skipped, the 4th stops the run."""
    with pytest.raises(AssertionError, match=r"TrainingDivergedError: step 2: non-finite loss/gradients 4 steps in a "
                       r"row, more than --max_skipped_steps 3; the last finite checkpoint is .*checkpoint-1"):
        launch(TRAIN, TINY_TRAIN + ["--pretrained_model_name_or_path", tokenized / "tokenizer", "--train_dataset",
                                    tokenized / "tokens", "--max_train_steps", "4", "--learning_rate", "1e30",
                                    "--lr_warmup_steps", "0", "--max_grad_norm", "0", "--checkpointing_steps", "1",
                                    "--validation_steps", "100", "--output_dir", tmp_path])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoint-1" / "model.safetensors").values())
