"""Download helpers so that pipelines whose components live in *this* package load from a Hub repo id.

Why this exists
---------------
Our ``model_index.json`` names components from our own package, e.g.
``"autoencoder": ["flowmo_diffusers", "FlowMoModel"]``. Loading such a pipeline from a *local folder* works in
diffusers (``load_sub_model`` just does ``importlib.import_module("flowmo_diffusers")``), but loading it from a
*Hub repo id* does not: ``DiffusionPipeline.from_pretrained("<user>/<repo>")`` first calls
``DiffusionPipeline.download``, which (diffusers 0.42.1, ``diffusers/pipelines/pipeline_utils.py:1687``) calls
``_get_custom_components_and_folders`` (``diffusers/pipelines/pipeline_loading_utils.py``, check at line 1101,
raise at 1102)::

    elif module_candidate not in LOADABLE_CLASSES and not hasattr(pipelines, module_candidate):
        raise ValueError(
            f"{candidate_file} as defined in `model_index.json` does not exist in {pretrained_model_name} "
            "and is not a module in 'diffusers/pipelines'."
        )

i.e. ``ValueError: autoencoder/flowmo_diffusers.py as defined in `model_index.json` does not exist in
<user>/<repo> and is not a module in 'diffusers/pipelines'.`` -- the download step only accepts components from
``diffusers``/``transformers``/``onnxruntime.training``, a diffusers pipeline module, or custom code shipped in
the repo (``<component>/<module>.py``), although the load step would import our installed package just fine.

So we resolve the repo id to a local snapshot ourselves (``huggingface_hub.hf_hub_download`` for
``model_index.json``, then ``huggingface_hub.snapshot_download`` restricted to the files the pipeline needs,
pinned to the same commit) and hand diffusers the *folder*, which takes its local-folder code path.
:class:`HubPipelineMixin` wires that into ``from_pretrained`` / ``download``.

A second diffusers 0.42.1 detail: ``save_pretrained`` records a component from outside diffusers under its *full*
module path (``[cls.__module__, cls.__name__]``, e.g. ``["flowmo_diffusers.models.flowmo", "FlowMoModel"]``), and
loading resolves that module from ``sys.modules`` only -- it never imports it
(``_get_library_or_raise``, ``diffusers/pipelines/pipeline_loading_utils.py:347-375``). :class:`HubPipelineMixin`
therefore imports, before loading, the component modules that belong to the pipeline class's own top-level
package (installed code we already run, never a module chosen by the repo alone).

Only public ``huggingface_hub`` APIs that exist since 0.34 are used (``hf_hub_download``, ``snapshot_download``,
``HfApi.model_info``, ``constants.HF_HUB_OFFLINE``); the cache layout, offline mode, tokens, etc. are
entirely huggingface_hub's.
"""

from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

# huggingface_hub 1.x talks httpx, 2.x httpx2 (exported as huggingface_hub.utils.httpx); their transport errors are
# not OSErrors. (0.x used requests, whose errors, like HfHubHTTPError, are OSErrors.)
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:
    from huggingface_hub.utils import httpx as _hub_httpx

    _NETWORK_ERRORS += (_hub_httpx.TransportError,)
except ImportError:
    pass
try:
    import httpx as _httpx

    _NETWORK_ERRORS += (_httpx.TransportError,)
except ImportError:
    pass

logger = logging.getLogger(__name__)

__all__ = [
    "HubPipelineMixin",
    "download_pipeline_folder",
    "download_single_file",
    "parse_single_file_link",
    "select_pipeline_files",
    "MODEL_INDEX_NAME",
]

MODEL_INDEX_NAME = "model_index.json"
_SAFETENSORS_SUFFIXES = (".safetensors",)
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Every weight format: a component folder's other files (configs, tokenizer files...) are always fetched.
_WEIGHT_SUFFIXES = _SAFETENSORS_SUFFIXES + _PICKLE_SUFFIXES + (
    ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".gguf", ".flashpack")
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

# from_pretrained kwargs consumed by the download step only / needed by both download and loading.
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")
_SHARED_KWARGS = ("variant", "use_safetensors")


def _weight_variant(filename: str) -> str | None:
    """``diffusion_pytorch_model.fp16.safetensors`` -> ``"fp16"``; ``model-00001-of-00002.safetensors`` -> None."""
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = _SHARD_RE.sub("", stem)
    return stem.split(".", 1)[1] if "." in stem else None


def _pipeline_components(model_index: dict, skip: Iterable[str] = ()) -> list[str]:
    """Names of the component folders declared in ``model_index.json`` (``name: [library, class]``)."""
    skip = set(skip)
    return [
        name
        for name, value in model_index.items()
        if not name.startswith("_")
        and name not in skip
        and isinstance(value, (list, tuple))
        and len(value) == 2
        and value[0] is not None
        and value[1] is not None
    ]


def select_pipeline_files(
    repo_files: Iterable[str],
    model_index: dict,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    skip_components: Iterable[str] = (),
) -> list[str]:
    """The repo files a pipeline needs: ``model_index.json`` and, per component folder, its non-weight files
    (configs...) plus its weights: safetensors if there are any, else ``.bin``/``.pth``/``.pt``/``.ckpt``
    (``use_safetensors=True``: safetensors only; ``False``: pickle only). With ``variant``, a component's
    ``*.<variant>.*`` weights are preferred, falling back to the non-variant ones (as diffusers does).
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    repo_files = sorted(set(repo_files))
    selected = [f"{prefix}{MODEL_INDEX_NAME}"]
    for component in _pipeline_components(model_index, skip_components):
        folder = f"{prefix}{component}/"
        files = [f for f in repo_files if f.startswith(folder)]
        selected += [f for f in files if not f.endswith(_WEIGHT_SUFFIXES)]

        def weights(suffixes: tuple[str, ...]) -> list[str]:
            candidates = [f for f in files if f.endswith(suffixes)]
            if variant is not None:
                preferred = [f for f in candidates if _weight_variant(f) == variant]
                if preferred:
                    return preferred
            return [f for f in candidates if _weight_variant(f) is None]

        safe, pickle = weights(_SAFETENSORS_SUFFIXES), weights(_PICKLE_SUFFIXES)
        if use_safetensors is True:
            selected += safe
        elif use_safetensors is False:
            selected += pickle
        else:
            selected += safe or pickle
    return selected


def download_pipeline_folder(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    proxies: dict | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    skip_components: Iterable[str] = (),
    user_agent: dict | str | None = None,
) -> str:
    """Local folder holding the pipeline (the one with ``model_index.json``) for a local path or a Hub repo id.

    A local folder (``pretrained_model_name_or_path[/subfolder]``) is returned as is. A repo id is downloaded
    into the huggingface_hub cache (``cache_dir``) and the snapshot folder (``/subfolder``) is returned:

    1. ``hf_hub_download`` of ``model_index.json`` (``revision``; its snapshot folder gives the commit hash);
    2. the repo's file list at that commit (``HfApi.model_info``), filtered by :func:`select_pipeline_files`
       (components named in ``skip_components`` -- those passed to ``from_pretrained`` as objects -- skipped);
    3. ``snapshot_download`` of exactly those files, pinned to that commit.

    With ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` nothing goes to the network: the cached snapshot
    that ``model_index.json`` resolves to is returned (``revision`` is looked up in the cache's refs).
    ``proxies`` is forwarded to huggingface_hub (which ignores it since 1.0: use ``HTTP(S)_PROXY`` there).

    Raises ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError`` (no
    ``model_index.json``) with the repo id in the message, ``OSError`` for a path that is neither a folder nor a
    repo id, and ``LocalEntryNotFoundError`` when offline and nothing is cached.
    """
    path = os.fspath(pretrained_model_name_or_path)
    subfolder = subfolder.strip("/") if subfolder else None
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if os.path.isdir(path):
        raise OSError(f"Pipeline folder {path!r} has no subfolder {subfolder!r}.")
    try:
        validate_repo_id(path)
    except HFValidationError as e:
        raise OSError(
            f"{path!r} is neither an existing local folder nor a valid Hub repo id ('<namespace>/<name>')."
        ) from e

    repo_id = path
    offline = bool(local_files_only) or bool(hf_constants.HF_HUB_OFFLINE)
    common: dict = {"cache_dir": cache_dir, "token": token}
    if proxies is not None:
        common["proxies"] = proxies
    if user_agent is not None:
        common["user_agent"] = user_agent
    where = f"'{repo_id}'" + (f" (revision '{revision}')" if revision else "")

    index_in_repo = f"{subfolder}/{MODEL_INDEX_NAME}" if subfolder else MODEL_INDEX_NAME
    try:
        index_file = hf_hub_download(
            repo_id, MODEL_INDEX_NAME, subfolder=subfolder, revision=revision, force_download=force_download,
            local_files_only=offline, **common,
        )
    except LocalEntryNotFoundError as e:
        reason = "offline mode is enabled (HF_HUB_OFFLINE=1)" if hf_constants.HF_HUB_OFFLINE else (
            "local_files_only=True" if local_files_only else "the Hub could not be reached")
        raise LocalEntryNotFoundError(
            f"Cannot load pipeline {where}: its {index_in_repo} is not in the local cache and {reason}."
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        e.append_to_message(f"\nCould not load pipeline {where}: repository or revision not found on the Hub.")
        raise
    except EntryNotFoundError as e:
        if hasattr(e, "append_to_message"):
            e.append_to_message(f"\nRepository {where} has no {index_in_repo}: it is not a diffusers pipeline.")
        raise

    # .../snapshots/<commit>/[subfolder/]model_index.json -> .../snapshots/<commit>
    snapshot_root = Path(index_file)
    for _ in index_in_repo.split("/"):
        snapshot_root = snapshot_root.parent
    folder = str(snapshot_root / subfolder) if subfolder else str(snapshot_root)
    if offline:
        return folder
    # Pin every download to the commit model_index.json came from, even if the branch moves meanwhile.
    commit = snapshot_root.name if _COMMIT_RE.match(snapshot_root.name) else revision

    with open(index_file, encoding="utf-8") as f:
        model_index = json.load(f)
    try:
        # model_info: a single GET without retry/backoff (list_repo_files retries ~20 s when the Hub is down).
        repo_files = [s.rfilename for s in HfApi().model_info(repo_id, revision=commit, token=token).siblings or []]
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except _NETWORK_ERRORS as e:
        # model_index.json was served from the cache because the Hub is unreachable: use the cached snapshot.
        logger.warning("Could not list the files of %s on the Hub (%s); using the cached snapshot %s.", where, e,
                       folder)
        return folder
    wanted = select_pipeline_files(repo_files, model_index, subfolder=subfolder, variant=variant,
                                   use_safetensors=use_safetensors, skip_components=skip_components)
    snapshot = snapshot_download(
        repo_id, revision=commit, force_download=force_download,
        allow_patterns=[glob.escape(f) for f in wanted], **common,
    )
    return os.path.join(snapshot, subfolder) if subfolder else str(snapshot)


_HUB_URL_RE = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<revision>[^/]+)/(?P<file>.+)$"
)
_HUB_SHORT_RE = re.compile(r"^(?P<repo>[^/:]+/[^/]+)/(?P<file>[^:]+)$")


def parse_single_file_link(link: str) -> tuple[str, str, str | None]:
    """``(repo_id, filename, revision)`` of a file on the Hub given as a link.

    Accepted: ``https://huggingface.co/<namespace>/<name>/blob/<revision>/<path>`` (also ``/resolve/``, ``hf.co``,
    without the scheme; a ``revision`` such as ``refs%2Fpr%2F1`` is unquoted), and ``<namespace>/<name>/<path>``
    (revision ``None``: the caller's ``revision`` or ``main``).

    Written here because diffusers' own parser (``_extract_repo_id_and_weights_name`` in
    ``diffusers.loaders.single_file_utils``) is private and only understands ``blob/main``: a link to another
    branch or a commit would silently load ``main``.
    """
    link = str(link).split("?", 1)[0].split("#", 1)[0]
    match = _HUB_URL_RE.match(link)
    if match:
        revision = urllib.parse.unquote(match["revision"])
    else:
        match = _HUB_SHORT_RE.match(link)
        if not match or link.startswith(("http://", "https://")):
            raise ValueError(
                f"{link!r} is neither a local file nor a Hub file link: use a path, "
                "'https://huggingface.co/<namespace>/<name>/blob/<revision>/<file>' or '<namespace>/<name>/<file>'"
            )
        revision = None
    repo_id, filename = match["repo"], urllib.parse.unquote(match["file"])
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{link!r}: {repo_id!r} is not a valid Hub repo id ({e})") from None
    return repo_id, filename, revision


def download_single_file(
    link_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    user_agent: dict | str | None = None,
) -> str:
    """Local path of one file: ``link_or_path`` itself when it is a local file, else the Hub file it links to
    (see :func:`parse_single_file_link`), downloaded with ``hf_hub_download`` into the huggingface_hub cache
    (``cache_dir``), so a second call, ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` reuse it.

    ``revision`` applies to ``<namespace>/<name>/<file>`` links; a ``blob/<revision>`` link carries its own, and
    giving a different ``revision`` too is an error.
    """
    path = os.fspath(link_or_path)
    if os.path.isfile(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a folder, not a single checkpoint file")
    repo_id, filename, link_revision = parse_single_file_link(path)
    if link_revision is not None and revision is not None and revision != link_revision:
        raise ValueError(f"revision={revision!r} disagrees with the revision {link_revision!r} in the link {path!r}")
    revision = link_revision or revision
    offline = bool(local_files_only) or bool(hf_constants.HF_HUB_OFFLINE)
    where = f"'{filename}' of '{repo_id}'" + (f" (revision '{revision}')" if revision else "")
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline,
            force_download=force_download, **({"user_agent": user_agent} if user_agent is not None else {}),
        )
    except LocalEntryNotFoundError as e:
        reason = "offline mode is enabled (HF_HUB_OFFLINE=1)" if hf_constants.HF_HUB_OFFLINE else (
            "local_files_only=True" if local_files_only else "the Hub could not be reached")
        raise LocalEntryNotFoundError(f"Cannot load {where}: it is not in the local cache and {reason}.") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        if hasattr(e, "append_to_message"):
            e.append_to_message(f"\n{path!r} is not a local file, and {where} could not be found on the Hub.")
        raise


class HubPipelineMixin:
    """Make ``from_pretrained("<user>/<repo>")`` (and ``download``) work for a ``DiffusionPipeline`` whose
    components come from a package other than diffusers (see the module docstring for the diffusers check this
    works around). Put it *before* ``DiffusionPipeline`` in the bases::

        class FlowMoPipeline(HubPipelineMixin, DiffusionPipeline): ...

    ``from_pretrained`` resolves the folder with :func:`download_pipeline_folder` (which consumes ``cache_dir``,
    ``revision``, ``token``, ``local_files_only``, ``force_download``, ``proxies``, ``subfolder``, and reads
    ``variant`` / ``use_safetensors``), then calls ``DiffusionPipeline.from_pretrained(folder, **rest)``.
    Components passed as objects (``from_pretrained(repo, scheduler=my_scheduler)``) are not downloaded.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        from diffusers import DiffusionPipeline

        mro = cls.__mro__
        if DiffusionPipeline in mro and mro.index(DiffusionPipeline) < mro.index(HubPipelineMixin):
            raise TypeError(
                f"{cls.__name__}: list HubPipelineMixin before DiffusionPipeline in the base classes, otherwise "
                "DiffusionPipeline.from_pretrained shadows HubPipelineMixin.from_pretrained."
            )

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Drop-in for ``DiffusionPipeline.download``: returns the local pipeline folder."""
        download_kwargs = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS + _SHARED_KWARGS if k in kwargs}
        return download_pipeline_folder(pretrained_model_name, skip_components=tuple(kwargs), **download_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # DiffusionPipeline.from_pretrained(<repo id>) would go through DiffusionPipeline.download, whose
        # _get_custom_components_and_folders rejects components that are not from diffusers/transformers
        # ("... is not a module in 'diffusers/pipelines'", see the module docstring). Handing it a local folder
        # takes the code path that loads them fine.
        download_kwargs = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
        download_kwargs.update({k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs})
        folder = download_pipeline_folder(
            pretrained_model_name_or_path, skip_components=tuple(kwargs), **download_kwargs
        )
        _import_own_component_modules(cls, folder)
        check_component_classes(cls, folder, skip=tuple(kwargs))
        return super().from_pretrained(folder, **kwargs)


def _import_own_component_modules(pipeline_cls: type, folder: str) -> None:
    """Import the modules ``model_index.json`` names for components, if they are in ``pipeline_cls``'s package.

    diffusers 0.42.1 looks non-diffusers component modules up in ``sys.modules`` and refuses to import them
    ("... has not been imported"); a module of our own package may not be imported yet (lazy imports, a
    scheduler module the pipeline module does not import). Modules outside that package are left to diffusers.
    """
    package = pipeline_cls.__module__.split(".")[0]
    try:
        with open(os.path.join(folder, MODEL_INDEX_NAME), encoding="utf-8") as f:
            model_index = json.load(f)
    except (OSError, ValueError):
        return  # diffusers reports a missing / broken model_index.json itself
    for name in _pipeline_components(model_index):
        module = model_index[name][0]
        if isinstance(module, str) and module.split(".")[0] == package and module not in sys.modules:
            importlib.import_module(module)


def check_component_classes(pipeline_cls: type, folder: str, skip: Iterable[str] = ()) -> None:
    """Raise ValueError if ``model_index.json`` names, for a component, a class the pipeline does not accept.

    diffusers only logs "Expected types for ... got ..." and loads the class anyway; with the wrong class the
    weights do not match and the component loaded partly random, failing later. The expected classes are the
    annotations of ``pipeline_cls.__init__``. Components from modules that are not imported (and not from this
    package, diffusers or transformers) are left to diffusers, which refuses them itself.
    """
    import typing

    try:
        with open(os.path.join(folder, MODEL_INDEX_NAME), encoding="utf-8") as f:
            model_index = json.load(f)
        hints = typing.get_type_hints(pipeline_cls.__init__)
    except (OSError, ValueError, NameError, TypeError):
        return  # diffusers reports a missing / broken model_index.json itself
    own = pipeline_cls.__module__.split(".")[0]
    for name in _pipeline_components(model_index, skip=skip):
        expected = hints.get(name)
        entry = model_index.get(name)
        if expected is None or not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(e, str) for e in entry):
            continue
        module_name, class_name = entry
        if module_name.split(".")[0] not in (own, "diffusers", "transformers") and module_name not in sys.modules:
            continue
        try:
            component_cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # diffusers names what it cannot import
        accepted = tuple(t for t in (typing.get_args(expected) or (expected,)) if isinstance(t, type))
        if accepted and not (isinstance(component_cls, type) and issubclass(component_cls, accepted)):
            raise ValueError(
                f"{os.path.join(folder, MODEL_INDEX_NAME)} names {module_name}.{class_name} for {name!r}, but "
                f"{pipeline_cls.__name__} takes {' or '.join(t.__name__ for t in accepted)} there; refusing to load "
                "a component of the wrong class (its weights would not match)"
            )
