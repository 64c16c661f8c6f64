"""`from_single_file`: the original `.pth` (local, or on the local Hub stand-in) straight into a model / pipeline,
equal to what the conversion script writes."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, FlowMoScheduler
from flowmo_diffusers.conversion import CheckpointConversionError, UnsafeCheckpointError
from flowmo_diffusers.conversion.single_file import parse_single_file_link

from testing_utils import ORIGINAL_CHECKPOINT as CHECKPOINT
from testing_utils import ORIGINAL_TINY, WritesAMarker
from testing_utils import load_conversion_script as load_script

CONFIG = ORIGINAL_TINY / "config.yaml"
DIT_BASE = json.loads((ORIGINAL_TINY / "dit_base.json").read_text())["dit_b_4"]
SCRIPT_CONFIG = ["--original_config", str(CONFIG), "--original_dit_base", str(ORIGINAL_TINY / "dit_base.json")]
REPO = "user/flowmo-tiny-original"


def script_output(folder: Path, *extra: str) -> Path:
    """The folder `scripts/convert_flowmo_original_to_diffusers.py` writes."""
    load_script().main(["--checkpoint_path", str(CHECKPOINT), "--output_path", str(folder), *SCRIPT_CONFIG, *extra])
    return folder


def public(config):
    return {key: value for key, value in config.items() if not key.startswith("_")}


def assert_same_pipeline(pipe: FlowMoPipeline, folder: Path) -> None:
    """`pipe` holds exactly the weights (bit for bit, dtype included) and configs the script wrote to `folder`."""
    written = load_file(folder / "autoencoder" / "diffusion_pytorch_model.safetensors")
    state = pipe.autoencoder.state_dict()
    assert state.keys() == written.keys()
    for key, value in written.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    expected = FlowMoPipeline.from_pretrained(folder)
    assert public(pipe.autoencoder.config) == public(expected.autoencoder.config)
    assert type(pipe.scheduler) is type(expected.scheduler)
    assert public(pipe.scheduler.config) == public(expected.scheduler.config)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return script_output(tmp_path_factory.mktemp("script"))


@pytest.fixture
def served(local_hub):
    """The tiny original checkpoint and its trainer config on the local Hub stand-in; a `dev` branch holds a
    checkpoint without EMA weights."""
    files = {"flowmo_tiny_original.pth": CHECKPOINT.read_bytes(), "config.yaml": CONFIG.read_text()}
    sha = local_hub.add_repo(REPO, files=files)
    state = torch.load(CHECKPOINT, weights_only=True)
    dev = Path(local_hub.client.home) / "dev.pth"
    torch.save({"model_state_dict": state["model_state_dict"]}, dev)
    local_hub.add_repo(REPO, files={**files, "flowmo_tiny_original.pth": dev.read_bytes()}, revision="dev")
    return local_hub, sha


def test_local_file_equals_the_conversion_script(converted):
    pipe = FlowMoPipeline.from_single_file(CHECKPOINT, original_config=CONFIG, original_dit_base=DIT_BASE)
    assert_same_pipeline(pipe, converted)
    assert pipe.scheduler.config.guidance_interval == (0.17, 1.02)  # from the config.yaml's eval.sampling
    model = FlowMoModel.from_single_file(str(CHECKPOINT), original_config=str(CONFIG), original_dit_base=DIT_BASE)
    assert isinstance(model, FlowMoModel) and not model.training
    for key, value in load_file(converted / "autoencoder" / "diffusion_pytorch_model.safetensors").items():
        assert torch.equal(model.state_dict()[key], value)


def test_ema_choice_and_dtype_follow_the_script(tmp_path, converted):
    no_ema = FlowMoPipeline.from_single_file(
        CHECKPOINT, original_config=CONFIG, original_dit_base=DIT_BASE, extract_ema=False
    )
    assert_same_pipeline(no_ema, script_output(tmp_path / "no_ema", "--no_ema"))
    weight = "decoder.proj_out.weight"
    ema = FlowMoModel.from_pretrained(converted / "autoencoder")
    assert not torch.equal(no_ema.autoencoder.state_dict()[weight], ema.state_dict()[weight])

    bf16 = FlowMoPipeline.from_single_file(
        CHECKPOINT, original_config=CONFIG, original_dit_base=DIT_BASE, torch_dtype=torch.bfloat16
    )
    assert bf16.autoencoder.dtype == torch.bfloat16
    assert_same_pipeline(bf16, script_output(tmp_path / "bf16", "--dtype", "bf16"))


def test_passed_scheduler_is_used():
    scheduler = FlowMoScheduler(time_schedule="linear")
    pipe = FlowMoPipeline.from_single_file(
        CHECKPOINT, original_config=CONFIG, original_dit_base=DIT_BASE, scheduler=scheduler
    )
    assert pipe.scheduler is scheduler


def test_hub_link_downloads_into_the_cache_and_then_works_offline(served, converted, tmp_path):
    hub, sha = served
    link = f"https://huggingface.co/{REPO}/blob/main/flowmo_tiny_original.pth"
    pipe = FlowMoPipeline.from_single_file(link, original_config=f"{REPO}/config.yaml", original_dit_base=DIT_BASE)
    assert_same_pipeline(pipe, converted)
    assert hub.downloaded_files(REPO) == {"flowmo_tiny_original.pth", "config.yaml"}
    cached = Path(hub.client.cache_dir) / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha
    assert (cached / "flowmo_tiny_original.pth").read_bytes() == CHECKPOINT.read_bytes()

    hub.clear_requests()
    with hub.offline():  # HF_HUB_OFFLINE=1: from the cache, no request
        again = FlowMoModel.from_single_file(f"{REPO}/flowmo_tiny_original.pth", original_config=CONFIG,
                                             original_dit_base=DIT_BASE)
    assert hub.requests == []
    assert torch.equal(again.state_dict()["decoder.proj_out.weight"], pipe.autoencoder.state_dict()["decoder.proj_out.weight"])

    with pytest.raises(LocalEntryNotFoundError, match="local_files_only=True"):
        FlowMoModel.from_single_file(link, original_config=CONFIG, original_dit_base=DIT_BASE,
                                     cache_dir=tmp_path / "empty-cache", local_files_only=True)
    assert hub.unhandled == []


def test_hub_revision_and_cache_dir(served, tmp_path):
    hub, _ = served
    cache = tmp_path / "cache"
    dev = FlowMoModel.from_single_file(f"hf.co/{REPO}/blob/dev/flowmo_tiny_original.pth", original_config=CONFIG,
                                       original_dit_base=DIT_BASE, cache_dir=cache)
    no_ema = FlowMoModel.from_single_file(CHECKPOINT, original_config=CONFIG, original_dit_base=DIT_BASE,
                                          extract_ema=False)
    for key, value in no_ema.state_dict().items():  # the dev branch's checkpoint has no EMA weights
        assert torch.equal(dev.state_dict()[key], value)
    assert list(cache.glob("models--user--flowmo-tiny-original/snapshots/*/flowmo_tiny_original.pth"))
    same = FlowMoModel.from_single_file(f"{REPO}/flowmo_tiny_original.pth", revision="dev", original_config=CONFIG,
                                        original_dit_base=DIT_BASE, cache_dir=cache)
    assert torch.equal(same.state_dict()["decoder.proj_out.weight"], dev.state_dict()["decoder.proj_out.weight"])

    with pytest.raises(ValueError, match="revision='main' disagrees with the revision 'dev'"):
        FlowMoModel.from_single_file(f"https://huggingface.co/{REPO}/blob/dev/flowmo_tiny_original.pth",
                                     revision="main", preset="flowmo-tiny")
    with pytest.raises(EntryNotFoundError, match="could not be found on the Hub"):
        FlowMoModel.from_single_file(f"{REPO}/missing.pth", preset="flowmo-tiny")


def test_converter_errors_come_through(tmp_path):
    with pytest.raises(CheckpointConversionError, match="mis-shaped keys"):
        FlowMoPipeline.from_single_file(CHECKPOINT, preset="flowmo-lo")
    hostile = tmp_path / "hostile.pth"
    torch.save({"model_ema_state_dict": {}, "payload": WritesAMarker(tmp_path / "marker")}, hostile)
    with pytest.raises(UnsafeCheckpointError, match="non-tensor pickled objects"):
        FlowMoModel.from_single_file(hostile, preset="flowmo-tiny")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of preset="),
        ({"preset": "flowmo-tiny", "original_config": CONFIG}, "exactly one of preset="),
        ({"preset": "flowmo-tiny", "torch_dtype": "bf16"}, "torch_dtype must be a torch.dtype"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowMoPipeline.from_single_file(CHECKPOINT, **kwargs)


def test_bad_links_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither a local file nor a Hub file link"):
        FlowMoModel.from_single_file("https://example.com/flowmo_lo.pth", preset="flowmo-lo")
    with pytest.raises(ValueError, match="neither a local file nor a Hub file link"):
        FlowMoModel.from_single_file("missing.pth", preset="flowmo-lo")
    with pytest.raises(ValueError, match="is a folder"):
        FlowMoModel.from_single_file(tmp_path, preset="flowmo-lo")


@pytest.mark.parametrize(
    "link, expected",
    [
        ("https://huggingface.co/ksarge/FlowMo/blob/main/flowmo_lo.pth", ("ksarge/FlowMo", "flowmo_lo.pth", "main")),
        ("https://huggingface.co/a/b/resolve/v1.0/sub/dir/x.pth?download=true", ("a/b", "sub/dir/x.pth", "v1.0")),
        ("https://hf.co/a/b/blob/refs%2Fpr%2F3/x.pth", ("a/b", "x.pth", "refs/pr/3")),
        ("huggingface.co/a/b/blob/0123abc/x.pth", ("a/b", "x.pth", "0123abc")),
        ("ksarge/FlowMo/flowmo_hi.pth", ("ksarge/FlowMo", "flowmo_hi.pth", None)),
        ("a/b/sub/x.pth", ("a/b", "sub/x.pth", None)),
    ],
)
def test_link_parsing(link, expected):
    assert parse_single_file_link(link) == expected
