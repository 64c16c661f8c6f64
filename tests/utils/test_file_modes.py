"""Files follow the umask (`flowmo_diffusers.utils.files`): everything the package writes gets the mode a plain `open()`
/ `os.makedirs` would give it (0644 / 0755 under umask 022, 0664 / 0775 under 002), atomic writes included, although
`tempfile.mkstemp` and safetensors' own writer create 0600 files. Each writer runs for real under each umask and the
whole output tree is checked; only the output lock's files are left out (they are not outputs)."""

import fnmatch
import os
import stat

import pytest
import torch
from accelerate import Accelerator

from flowmo_diffusers.data import load_default_image_dataset
from flowmo_diffusers.evaluation.reconstruction import EvaluationConfig, evaluate_tokenizers
from flowmo_diffusers.evaluation.resume import PartialEvaluationState
from flowmo_diffusers.evaluation.sampling import SamplingConfig, sample_to_folder
from flowmo_diffusers.training.checkpointing import save_checkpoint
from flowmo_diffusers.training.pretokenize import (
    TokenizationInfo,
    assemble_token_dataset,
    pretokenize,
    write_token_codebook_statistics,
)
from flowmo_diffusers.training.recipe import TrainingProgress
from flowmo_diffusers.utils import files
from flowmo_diffusers.utils.files import atomic_write, current_umask, default_mode, follow_umask
from flowmo_diffusers.utils.output_lock import LOCK_FILES_PATTERN

from testing_utils import tiny_flowmo_model, tiny_flowmo_pipeline, tiny_maskgit_pipeline, tiny_maskgit_transformer

UMASKS = {0o022: (0o644, 0o755), 0o002: (0o664, 0o775)}


@pytest.fixture(params=sorted(UMASKS), ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    """Runs the test under this umask (restored afterwards); yields `(umask, file mode, folder mode)`."""
    previous = os.umask(request.param)
    try:
        yield (request.param, *UMASKS[request.param])
    finally:
        os.umask(previous)


def modes_under(folder):
    """`{relative path: mode}` of every file and folder under `folder` (the output lock's files left out)."""
    found = {}
    for root, folders, names in os.walk(folder):
        for name in folders + names:
            if fnmatch.fnmatch(name, LOCK_FILES_PATTERN):
                continue
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def assert_modes(folder, file_mode, folder_mode, expected_names=(), check_folder=True):
    """Every file and folder under `folder` (and `folder` itself with `check_folder`: not pytest's 0700 tmp_path) has
    the mode `open()` / `os.makedirs` gives; `expected_names` are among them."""
    found = modes_under(folder)
    for name in expected_names:
        assert name in found, f"{name} was not written: {sorted(found)}"
    wrong = {
        name: oct(mode)
        for name, mode in found.items()
        if mode != (folder_mode if os.path.isdir(os.path.join(folder, name)) else file_mode)
    }
    assert not wrong, f"expected files {file_mode:o} and folders {folder_mode:o}, got {wrong}"
    if check_folder:
        assert stat.S_IMODE(os.stat(folder).st_mode) == folder_mode


def test_the_umask_is_read_without_changing_it(umask, monkeypatch):
    mask, file_mode, folder_mode = umask
    assert current_umask() == mask and default_mode() == file_mode and default_mode(directory=True) == folder_mode

    def no_proc(path, *args, **kwargs):  # a kernel without `Umask:` in /proc/self/status: set and restore instead
        raise FileNotFoundError(path)

    monkeypatch.setattr(files, "open", no_proc, raising=False)
    assert current_umask() == mask
    assert os.umask(mask) == mask  # left as it was


def test_atomic_write_gives_a_plain_open_mode(umask, tmp_path):
    _, file_mode, _ = umask
    with open(tmp_path / "plain", "wb") as handle:
        handle.write(b"x")
    with atomic_write(tmp_path / "nested" / "atomic.json") as handle:
        handle.write(b"{}")
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == file_mode  # what the test expects is open()'s mode
    assert (tmp_path / "nested" / "atomic.json").read_bytes() == b"{}"
    assert_modes(tmp_path, file_mode, umask[2], ["nested", "nested/atomic.json"], check_folder=False)


def test_follow_umask_changes_only_what_the_block_wrote(umask, tmp_path):
    _, file_mode, folder_mode = umask
    kept = tmp_path / "kept.txt"
    kept.write_text("mine")
    kept.chmod(0o600)  # the user's own choice for a file that was there before
    (tmp_path / "replaced").write_bytes(b"old")
    with follow_umask(tmp_path):
        (tmp_path / "kept.txt").write_text("rewritten in place")  # open() keeps an existing file's mode
        descriptor = os.open(tmp_path / "new", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors and mkstemp do
        os.close(descriptor)
        os.makedirs(tmp_path / "sub")
        os.chmod(tmp_path / "sub", 0o700)
        descriptor = os.open(tmp_path / "replacement", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(descriptor)
        os.replace(tmp_path / "replacement", tmp_path / "replaced")
    found = modes_under(tmp_path)
    assert found == {"kept.txt": 0o600, "new": file_mode, "sub": folder_mode, "replaced": file_mode}


def test_a_checkpoint_folder_and_its_files(umask, tmp_path):
    _, file_mode, folder_mode = umask
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(accelerator, str(tmp_path / "run"), 1, states={"progress": TrainingProgress(global_step=1)})
    # model.safetensors and training_states.safetensors come from safetensors' 0600 writer, the rest from torch.save.
    assert_modes(tmp_path / "run", file_mode, folder_mode, [
        "checkpoint-1", "checkpoint-1/model.safetensors", "checkpoint-1/optimizer.bin",
        "checkpoint-1/random_states_0.pkl", "checkpoint-1/training_states.json",
        "checkpoint-1/training_states.safetensors",
    ])  # fmt: skip


def test_save_pretrained_of_both_pipelines(umask, tmp_path):
    _, file_mode, folder_mode = umask
    tiny_flowmo_pipeline().save_pretrained(tmp_path / "flowmo")
    tiny_maskgit_pipeline(tiny_maskgit_transformer(), tiny_flowmo_model()).save_pretrained(tmp_path / "maskgit")
    weights = "diffusion_pytorch_model.safetensors"
    assert_modes(tmp_path, file_mode, folder_mode, [
        "flowmo/model_index.json", f"flowmo/autoencoder/{weights}", "flowmo/scheduler/scheduler_config.json",
        f"maskgit/transformer/{weights}", f"maskgit/autoencoder/{weights}",
    ], check_folder=False)  # fmt: skip
    # Saving again over the folder (new weights replace the old files) gives the same modes.
    tiny_flowmo_pipeline(tiny_flowmo_model(seed=1)).save_pretrained(tmp_path / "flowmo")
    assert_modes(tmp_path / "flowmo", file_mode, folder_mode, [f"autoencoder/{weights}"])


def test_evaluation_results_and_partial_state(umask, tmp_path):
    _, file_mode, folder_mode = umask
    tiny_flowmo_pipeline().save_pretrained(tmp_path / "inputs" / "pipeline")
    photos = load_default_image_dataset()
    for index in range(2):
        photos[index]["image"].save(tmp_path / "inputs" / f"photo_{index}.png")
    config = EvaluationConfig(
        pretrained_model_name_or_path=[str(tmp_path / "inputs" / "pipeline")], data_dir=str(tmp_path / "inputs"),
        batch_size=2, num_inference_steps=2, seed=0, random_init_feature_networks=True, inception_feature_dims=64,
        lpips_nets=["alex"], output_dir=str(tmp_path / "eval"),
    )  # fmt: skip
    evaluate_tokenizers(config, Accelerator(cpu=True))
    assert_modes(tmp_path / "eval", file_mode, folder_mode, ["results.json", "results.md"])
    # The state a long evaluation saves every --resume_every_batches (removed once the results are written).
    PartialEvaluationState(tmp_path / "partial", {"seed": 0}).save({"images_done": 2}, {"sum": torch.zeros(3)})
    assert_modes(tmp_path / "partial", file_mode, folder_mode, [
        "partial_evaluation/process-0.json", "partial_evaluation/process-0-000001.safetensors",
    ])  # fmt: skip


def test_pretokenized_chunks_and_dataset(umask, tmp_path):
    _, file_mode, folder_mode = umask
    model = tiny_flowmo_model()
    output_dir = str(tmp_path / "tokens")
    pretokenize(model, load_default_image_dataset(), output_dir, batch_size=4, chunk_size=4, show_progress=False)
    info = TokenizationInfo(tokenizer="tiny", num_indices=24, codebook_size=16, resolution=32, flip=False,
                            num_classes=9, streaming=False, num_processes=1)  # fmt: skip
    assemble_token_dataset(output_dir, info)
    write_token_codebook_statistics(output_dir)
    assert_modes(output_dir, file_mode, folder_mode, [
        "chunks/chunk-00000000.parquet", "chunks/chunk-00000000.json", "chunks/chunk-00000002.parquet",
        "dataset/tokenization.json", "dataset/codebook_statistics.json",
    ])  # fmt: skip


def test_maskgit_samples(umask, tmp_path):
    _, file_mode, folder_mode = umask
    tiny_maskgit_pipeline(tiny_maskgit_transformer(), tiny_flowmo_model()).save_pretrained(tmp_path / "pipeline")
    config = SamplingConfig(
        pretrained_model_name_or_path=str(tmp_path / "pipeline"), output_dir=str(tmp_path / "samples"),
        class_ids=[1, 2], num_images_per_class=1, num_inference_steps=2, decoder_num_inference_steps=2, batch_size=2,
        cpu=True, npz_path=str(tmp_path / "samples" / "samples.npz"),
    )  # fmt: skip
    sample_to_folder(config, Accelerator(cpu=True))
    assert_modes(tmp_path / "samples", file_mode, folder_mode, [
        "00000_class0001.png", "00000_class0002.png", "samples.npz", "sampling_config.json",
    ])  # fmt: skip
