"""Loading / pushing pipelines by Hub repo id, against the local Hub stand-in of ``tests/hub_stub.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    HfApi,
    RepoFile,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    model_info,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from flowmo_diffusers.utils.hub import HubPipelineMixin

from hub_dummy_components import (
    TinyHubMixinPipeline,
    TinyHubModel,
    TinyHubPipeline,
    TinyHubScheduler,
    make_tiny_pipeline,
)
from hub_stub import LocalHub, running_hub

PIPELINE_FILES = {
    "model_index.json",
    "autoencoder/config.json",
    "autoencoder/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
}


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A TinyHubMixinPipeline saved with save_pretrained, and its autoencoder weights."""
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    pipe = make_tiny_pipeline(TinyHubMixinPipeline)
    pipe.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in pipe.autoencoder.state_dict().items()}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}


def _assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- (a) the stub


def test_stub_serves_hf_hub_download_and_snapshot_download(local_hub, tmp_path):
    files = {"config.json": '{"a": 1}', "sub/dir/weights.safetensors": b"\x00\x01" * 300, "README.md": "# hi"}
    sha = local_hub.add_repo("user/files", files=files)
    dev_sha = local_hub.add_repo("user/files", files={"config.json": '{"a": 2}'}, revision="dev")

    # hf_hub_download: HEAD metadata + GET content, into the isolated cache
    path = hf_hub_download("user/files", "config.json")
    assert Path(path).read_text() == '{"a": 1}'
    assert Path(path).is_relative_to(local_hub.client.cache_dir)
    assert f"/snapshots/{sha}/" in path
    meta = get_hf_file_metadata(hf_hub_url("user/files", "sub/dir/weights.safetensors"))
    assert (meta.commit_hash, meta.size) == (sha, 600)
    weights = hf_hub_download("user/files", "weights.safetensors", subfolder="sub/dir")
    assert Path(weights).read_bytes() == b"\x00\x01" * 300
    assert Path(hf_hub_download("user/files", "config.json", revision="dev")).read_text() == '{"a": 2}'
    assert Path(hf_hub_download("user/files", "config.json", revision=dev_sha)).read_text() == '{"a": 2}'

    # model_info / repo_info
    info = model_info("user/files")
    assert info.sha == sha
    assert {s.rfilename for s in info.siblings} == set(files)

    # the tree listing (snapshot_download uses it from huggingface_hub 1.x on; 1.3 reads repo_info's siblings)
    local_hub.clear_requests()
    listed = {entry.path for entry in HfApi().list_repo_tree("user/files", recursive=True) if isinstance(entry, RepoFile)}
    assert listed == set(files)
    # Which endpoints serve the listing changes between releases (2.4 asks for the repo info first); what matters
    # is the files listed, that the listing asked this repo, and that nothing was downloaded for it.
    assert local_hub.request_paths() and all("user/files" in path for path in local_hub.request_paths())
    assert local_hub.downloaded_files("user/files") == set()

    # snapshot_download: repo_info (+ tree listing) + per-file HEAD/GET
    local_hub.clear_requests()
    folder = Path(snapshot_download("user/files", allow_patterns=["*.json", "*.md"]))
    assert _files(folder) == {"config.json", "README.md", "sub/dir/weights.safetensors"}  # + the earlier one
    assert folder.name == sha
    paths = local_hub.request_paths()
    assert "/api/models/user/files/revision/main" in paths
    assert local_hub.downloaded_files("user/files") == {"README.md"}  # config.json was already cached
    full = Path(snapshot_download("user/files", local_dir=tmp_path / "full"))
    assert _files(full) - {p for p in _files(full) if p.startswith(".cache/")} == set(files)

    # errors carry the X-Error-Code huggingface_hub maps to typed exceptions
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/files", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/files", "config.json", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "config.json")
    assert local_hub.unhandled == []
    assert all(not r.authorized for r in local_hub.requests)  # no token leaks into the tests


def test_stub_works_for_a_fresh_process(tmp_path, saved_pipeline):
    """The env from ``client_env`` alone is enough for a new process (no in-process patching there)."""
    folder, _ = saved_pipeline
    with LocalHub() as hub:
        hub.add_repo("user/tiny", folder)
        script = textwrap.dedent("""
            from huggingface_hub import hf_hub_download, snapshot_download
            print(hf_hub_download("user/tiny", "model_index.json"))
            print(snapshot_download("user/tiny"))
        """)
        out = subprocess.run([sys.executable, "-c", script], env=hub.client_env(tmp_path / "home"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        index_file, snapshot = out.stdout.split()
        assert index_file.startswith(str((tmp_path / "home" / "hub").resolve()))
        assert _files(Path(snapshot)) == _files(folder)
        assert hub.unhandled == []


def test_client_patch_is_undone(tmp_path):
    import huggingface_hub.hf_api as hf_api

    before = (hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE, hf_api.api.endpoint,
              os.environ.get("HF_ENDPOINT"), os.environ.get("HF_HOME"))
    with running_hub(tmp_path / "home") as hub:
        port = hub.port
        assert hf_constants.ENDPOINT == hf_api.api.endpoint == hub.url == os.environ["HF_ENDPOINT"]
        assert hf_constants.HF_HUB_CACHE == str((tmp_path / "home" / "hub").resolve())
        # a module imported while patched copies the patched value; it must be reset on exit too
        late = sys.modules["diffusers._hub_stub_probe"] = types.ModuleType("diffusers._hub_stub_probe")
        late.ENDPOINT, late.HF_HUB_OFFLINE = hf_constants.ENDPOINT, hf_constants.HF_HUB_OFFLINE
        with hub.offline():
            assert hf_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
        assert hf_constants.HF_HUB_OFFLINE is False
    try:
        assert (hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE, hf_api.api.endpoint,
                os.environ.get("HF_ENDPOINT"), os.environ.get("HF_HOME")) == before
        assert late.ENDPOINT == before[0]
    finally:
        del sys.modules["diffusers._hub_stub_probe"]
    # the server is stopped: port closed, no server/request thread left behind
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("LocalHub") or "process_request" in t.name]


# ------------------------------------------------------------------------------- (b) loading by repo id


def test_plain_diffusion_pipeline_cannot_load_non_diffusers_components_by_repo_id(local_hub, saved_pipeline):
    """The diffusers 0.42.1 behaviour HubPipelineMixin works around (if this fails, diffusers changed)."""
    folder, _ = saved_pipeline
    local_hub.add_repo("user/tiny", folder)
    with pytest.raises(ValueError, match=r"autoencoder/hub_dummy_components\.py .* is not a module in "
                                         r"'diffusers/pipelines'"):
        TinyHubPipeline.from_pretrained("user/tiny")
    # ... while the very same files load fine from a local folder
    assert isinstance(TinyHubPipeline.from_pretrained(folder).autoencoder, TinyHubModel)


def test_mixin_pipeline_loads_by_repo_id(local_hub, saved_pipeline):
    folder, weights = saved_pipeline
    sha = local_hub.add_repo("user/tiny", folder)

    pipe = TinyHubMixinPipeline.from_pretrained("user/tiny")

    assert isinstance(pipe.autoencoder, TinyHubModel) and isinstance(pipe.scheduler, TinyHubScheduler)
    _assert_same_weights(pipe.autoencoder, weights)
    assert pipe.scheduler.config.num_train_timesteps == 10
    assert local_hub.downloaded_files("user/tiny") == PIPELINE_FILES
    assert local_hub.unhandled == []
    cached = local_hub.client.cache_dir / "models--user--tiny" / "snapshots" / sha
    assert Path(pipe.name_or_path) == cached
    # DiffusionPipeline.download is routed too
    assert Path(TinyHubMixinPipeline.download("user/tiny")) == cached


def test_only_needed_files_are_downloaded(local_hub, saved_pipeline, tmp_path):
    folder, _ = saved_pipeline
    extra = {
        "README.md": "# card",
        "samples/grid.png": b"png" * 10,
        "autoencoder/diffusion_pytorch_model.bin": b"pickle",
        "autoencoder/diffusion_pytorch_model.fp16.safetensors": b"half",
        "scheduler/notes.txt": "scheduler notes",  # non-weight files of a component folder are kept
        "unused/config.json": "{}",  # not a component in model_index.json
    }
    local_hub.add_repo("user/tiny", folder, files=extra)
    assert _files(Path(TinyHubMixinPipeline.download("user/tiny"))) == PIPELINE_FILES | {"scheduler/notes.txt"}
    assert local_hub.downloaded_files("user/tiny") == PIPELINE_FILES | {"scheduler/notes.txt"}

    # A variant on request, beside the plain weights diffusers falls back to; never pickle weights nor Python files.
    local_hub.add_repo("user/tiny-fp16", folder, files={**extra, "autoencoder/hub_dummy_components.py": "raise 0"})
    fp16 = _files(Path(TinyHubMixinPipeline.download("user/tiny-fp16", variant="fp16")))
    assert fp16 == PIPELINE_FILES | {"scheduler/notes.txt", "autoencoder/diffusion_pytorch_model.fp16.safetensors"}
    assert local_hub.downloaded_files("user/tiny-fp16") == fp16
    with pytest.raises(ValueError, match="use_safetensors=False"):
        TinyHubMixinPipeline.from_pretrained("user/tiny", use_safetensors=False)


def test_revision_subfolder_and_passed_components(local_hub, saved_pipeline, tmp_path):
    folder, weights = saved_pipeline
    other = tmp_path / "other"
    make_tiny_pipeline(TinyHubMixinPipeline, seed=1).save_pretrained(other)
    local_hub.add_repo("user/tiny", folder)
    local_hub.add_repo("user/tiny", other, revision="dev")
    local_hub.add_repo("user/nested", files={f"v1/{k}": v for k, v in local_hub.repo_files("user/tiny").items()})

    dev = TinyHubMixinPipeline.from_pretrained("user/tiny", revision="dev")
    assert not torch.equal(dev.autoencoder.encoder.weight, weights["encoder.weight"])
    nested = TinyHubMixinPipeline.from_pretrained("user/nested", subfolder="v1")
    _assert_same_weights(nested.autoencoder, weights)

    local_hub.clear_requests()
    scheduler = TinyHubScheduler(num_train_timesteps=3)
    pipe = TinyHubMixinPipeline.from_pretrained("user/tiny", scheduler=scheduler, cache_dir=tmp_path / "cache")
    assert pipe.scheduler is scheduler
    assert local_hub.downloaded_files("user/tiny") == PIPELINE_FILES - {"scheduler/scheduler_config.json"}
    assert (tmp_path / "cache" / "models--user--tiny").is_dir()


_TINYPKG = {
    "__init__.py": "",
    "model.py": """
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

class TinyPkgModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 3):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
""",
    "pipeline.py": """
from diffusers import DiffusionPipeline
from flowmo_diffusers.utils.hub import HubPipelineMixin

class TinyPkgPipeline(HubPipelineMixin, DiffusionPipeline):  # does not import tinypkg.model itself
    def __init__(self, autoencoder, scheduler):
        super().__init__()
        self.register_modules(autoencoder=autoencoder, scheduler=scheduler)
""",
}


def test_component_module_of_own_package_is_imported(local_hub, tmp_path, monkeypatch):
    """diffusers records ``[<full module path>, <class>]`` and only looks the module up in ``sys.modules``."""
    for name, text in _TINYPKG.items():
        (tmp_path / "pkgs" / "tinypkg").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkgs" / "tinypkg" / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    try:
        from tinypkg.model import TinyPkgModel
        from tinypkg.pipeline import TinyPkgPipeline

        TinyPkgPipeline(TinyPkgModel(), TinyHubScheduler()).save_pretrained(tmp_path / "saved")
        index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
        assert index["autoencoder"] == ["tinypkg.model", "TinyPkgModel"]
        local_hub.add_repo("user/pkg", tmp_path / "saved")
        del sys.modules["tinypkg.model"]  # as in a fresh process that imported only the pipeline

        # Plain diffusers, even from a folder: 0.42 refuses; older releases (0.36) import the module themselves.
        try:
            TinyHubPipeline.from_pretrained(tmp_path / "saved")
        except ValueError as error:
            assert "has not been imported" in str(error)
        sys.modules.pop("tinypkg.model", None)
        pipe = TinyPkgPipeline.from_pretrained("user/pkg")
        assert type(pipe.autoencoder).__module__ == "tinypkg.model"
    finally:
        for name in [m for m in sys.modules if m == "tinypkg" or m.startswith("tinypkg.")]:
            del sys.modules[name]


def test_local_folder_is_used_as_is(saved_pipeline):
    folder, weights = saved_pipeline
    assert TinyHubMixinPipeline.download(folder) == str(folder)
    _assert_same_weights(TinyHubMixinPipeline.from_pretrained(folder).autoencoder, weights)


def test_mixin_must_come_first():
    from diffusers import DiffusionPipeline

    with pytest.raises(TypeError, match="before DiffusionPipeline"):
        type("Wrong", (DiffusionPipeline, HubPipelineMixin), {})


# ------------------------------------------------------------------------------------- (c) offline / cache


def test_second_load_offline_uses_the_cache(local_hub, saved_pipeline):
    folder, weights = saved_pipeline
    local_hub.add_repo("user/tiny", folder)
    first = TinyHubMixinPipeline.from_pretrained("user/tiny")
    local_hub.clear_requests()

    with local_hub.offline():  # HF_HUB_OFFLINE=1
        pipe = TinyHubMixinPipeline.from_pretrained("user/tiny")
    assert local_hub.requests == []
    _assert_same_weights(pipe.autoencoder, weights)
    assert pipe.name_or_path == first.name_or_path

    pipe = TinyHubMixinPipeline.from_pretrained("user/tiny", local_files_only=True)
    assert local_hub.requests == []
    _assert_same_weights(pipe.autoencoder, weights)


def test_unreachable_hub_falls_back_to_the_cache(local_hub, saved_pipeline):
    folder, weights = saved_pipeline
    local_hub.add_repo("user/tiny", folder)
    cached = TinyHubMixinPipeline.from_pretrained("user/tiny").name_or_path
    local_hub.stop()  # connection refused from now on (the client still points at the closed port)

    pipe = TinyHubMixinPipeline.from_pretrained("user/tiny")
    assert pipe.name_or_path == cached
    _assert_same_weights(pipe.autoencoder, weights)
    # (an uncached repo would now raise LocalEntryNotFoundError naming it, but only after huggingface_hub's
    # own ~23 s of connection retries, so that case is not exercised here)


# -------------------------------------------------------------------------------------------- (d) errors


def test_missing_repo_errors_mention_the_repo_id(local_hub, tmp_path):
    with pytest.raises(RepositoryNotFoundError, match="user/does-not-exist"):
        TinyHubMixinPipeline.from_pretrained("user/does-not-exist")
    local_hub.add_repo("user/not-a-pipeline", files={"config.json": "{}"})
    with pytest.raises(EntryNotFoundError, match="user/not-a-pipeline"):
        TinyHubMixinPipeline.from_pretrained("user/not-a-pipeline")
    with local_hub.offline(), pytest.raises(LocalEntryNotFoundError, match="user/never-downloaded"):
        TinyHubMixinPipeline.from_pretrained("user/never-downloaded")
    with pytest.raises(OSError, match="neither an existing local folder nor a valid Hub repo id"):
        TinyHubMixinPipeline.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


# ----------------------------------------------------------------------------------------- (e) push_to_hub


def test_push_to_hub_uploads_exactly_the_pipeline_files(local_hub, tmp_path):
    pipe = make_tiny_pipeline(TinyHubMixinPipeline)
    pipe.save_pretrained(tmp_path / "local")
    local_sizes = {f: (tmp_path / "local" / f).stat().st_size for f in _files(tmp_path / "local")}
    with pytest.raises(HfHubHTTPError, match="401"):  # like the Hub, the stub wants a token for writes
        pipe.push_to_hub("user/pushed")
    assert local_hub.commits == []
    local_hub.clear_requests()

    pipe.push_to_hub("user/pushed", token="hf_dummy_token")

    (commit,) = local_hub.commits
    assert commit.repo_id == "user/pushed" and commit.revision == "main"
    assert set(commit.files) - {"README.md"} == PIPELINE_FILES  # README.md = diffusers' model card
    assert {f: s for f, s in commit.files.items() if f != "README.md"} == local_sizes
    assert commit.deleted == ()
    assert all(r.authorized for r in local_hub.requests if r.method == "POST")
    assert local_hub.unhandled == []
    # Weights go through LFS (the Hub's default .gitattributes pattern), the JSON files inline in the commit.
    lfs_uploads = [p for p in local_hub.request_paths("PUT") if p.startswith("/lfs-objects/")]
    assert len(lfs_uploads) == len({f for f in PIPELINE_FILES if f.endswith(".safetensors")}) > 0

    # ... and what was pushed loads back by repo id
    _assert_same_weights(TinyHubMixinPipeline.from_pretrained("user/pushed").autoencoder,
                         pipe.autoencoder.state_dict())

    # a single component pushes its config + weights
    pipe.autoencoder.push_to_hub("user/pushed-model", token="hf_dummy_token")
    assert set(local_hub.commits[-1].files) == {"README.md", "config.json", "diffusion_pytorch_model.safetensors"}
