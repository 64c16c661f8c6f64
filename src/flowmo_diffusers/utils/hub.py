"""Load a pipeline whose components live in *this* package from a Hub repo id: one ``snapshot_download``.

Our ``model_index.json`` names components of our own package (``["flowmo_diffusers", "FlowMoModel"]``). diffusers
loads those from a folder, but ``DiffusionPipeline.from_pretrained("<user>/<repo>")`` first runs its ``download``,
whose ``_get_custom_components_and_folders`` (diffusers 0.42.1, ``pipelines/pipeline_loading_utils.py:1101``)
refuses them: ``ValueError: autoencoder/flowmo_diffusers.py as defined in `model_index.json` does not exist in
<user>/<repo> and is not a module in 'diffusers/pipelines'.`` So :class:`HubPipelineMixin` downloads the snapshot
itself -- one ``huggingface_hub.snapshot_download``, whose revision, token, cache, ``local_files_only`` /
``HF_HUB_OFFLINE`` and unreachable-Hub fallback are huggingface_hub's -- and hands diffusers the folder.

diffusers 0.42.1 also resolves a component recorded under its full module path (``["flowmo_diffusers.models.flowmo",
"FlowMoModel"]``) from ``sys.modules`` only (``_get_library_or_raise``, ``pipeline_loading_utils.py:347-375``): the
mixin imports those modules of the pipeline class's own package first (installed code, never one the repo chooses).
"""

from __future__ import annotations

import glob
import importlib
import inspect
import json
import os
import sys
import typing

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

__all__ = ["HubPipelineMixin", "check_component_classes"]

_HUB_ARGUMENTS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
# What a Hub snapshot never brings: pickle weights (they unpickle), Python files (diffusers' folder loader imports a
# component folder's `<library>.py` as custom code) and weight formats nothing here reads. Safetensors and the
# configs beside them are all a pipeline loads.
_NEVER_FETCHED = ["*.py", "*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data",
                  "*.pb", "*.gguf", "*.flashpack"]


def _components(folder: str, skip: typing.Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """``name: (module, class)`` of the components ``folder/model_index.json`` declares."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return {}  # diffusers reports a missing / broken model_index.json itself
    return {name: tuple(value) for name, value in index.items() if not name.startswith("_") and name not in skip
            and isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)}


class HubPipelineMixin:
    """``from_pretrained("<user>/<repo>")`` and ``download`` for a ``DiffusionPipeline`` whose components come from
    another package than diffusers; list it *before* ``DiffusionPipeline`` in the bases.

    A repo id is fetched by ``snapshot_download`` (``cache_dir``, ``revision``, ``token``, ``local_files_only``,
    ``force_download``; ``subfolder``): ``model_index.json`` and the folders of the components ``__init__`` takes
    (so nothing is read first), less those passed as objects; of the weights, safetensors only, a ``variant``'s on
    request (then all its safetensors: patterns cannot say "the plain ones only where the variant is missing").
    ``DiffusionPipeline.from_pretrained`` loads the folder with the other arguments; a local folder is used as is.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        from diffusers import DiffusionPipeline

        mro = cls.__mro__
        if DiffusionPipeline in mro and mro.index(DiffusionPipeline) < mro.index(HubPipelineMixin):
            raise TypeError(f"{cls.__name__}: list HubPipelineMixin before DiffusionPipeline in the base classes, "
                            "otherwise DiffusionPipeline.from_pretrained shadows HubPipelineMixin.from_pretrained.")

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Drop-in for ``DiffusionPipeline.download``: the local pipeline folder."""
        return cls._pipeline_folder(pretrained_model_name, kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = cls._pipeline_folder(pretrained_model_name_or_path, kwargs)  # takes the download arguments
        package = cls.__module__.split(".")[0]
        for module, _ in _components(folder).values():  # see the module docstring ("... has not been imported")
            if module.split(".")[0] == package and module not in sys.modules:
                importlib.import_module(module)
        check_component_classes(cls, folder, skip=tuple(kwargs))
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def _pipeline_folder(cls, name_or_path, kwargs: dict) -> str:
        hub = {key: kwargs.pop(key) for key in _HUB_ARGUMENTS if key in kwargs}
        subfolder = (kwargs.pop("subfolder", None) or "").strip("/")
        path = os.fspath(name_or_path)
        if os.path.isdir(path):
            if not os.path.isdir(os.path.join(path, subfolder)):
                raise OSError(f"Pipeline folder {path!r} has no subfolder {subfolder!r}.")
            return os.path.join(path, subfolder) if subfolder else path
        try:
            validate_repo_id(path)
        except HFValidationError as e:
            raise OSError(f"{path!r} is neither an existing local folder nor a valid Hub repo id "
                          "('<namespace>/<name>').") from e
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"use_safetensors=False cannot load {path!r}: pipelines come from the Hub as safetensors "
                             "only (nothing downloaded is unpickled); leave use_safetensors out")
        prefix = f"{glob.escape(subfolder)}/" if subfolder else ""
        folders = [f"{prefix}{name}/" for name, p in inspect.signature(cls.__init__).parameters.items()
                   if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in kwargs]
        ignore = _NEVER_FETCHED + ([f"{f}*.*.safetensors" for f in folders] if kwargs.get("variant") is None else [])
        where = f"'{path}'" + (f" (revision '{hub['revision']}')" if hub.get("revision") else "")
        try:
            snapshot = snapshot_download(
                path, allow_patterns=[f"{prefix}model_index.json", *(f"{f}*" for f in folders)], ignore_patterns=ignore,
                **hub)
        except LocalEntryNotFoundError as e:
            reason = ("offline mode is enabled (HF_HUB_OFFLINE=1)" if hf_constants.HF_HUB_OFFLINE else
                      "local_files_only=True" if hub.get("local_files_only") else "the Hub could not be reached")
            raise LocalEntryNotFoundError(f"Cannot load pipeline {where}: it is not (fully) in the local cache and "
                                          f"{reason}. ({e})") from e
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            e.append_to_message(f"\nCould not load pipeline {where}: repository or revision not found on the Hub.")
            raise
        folder = os.path.join(snapshot, subfolder) if subfolder else str(snapshot)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise EntryNotFoundError(f"Repository {where} has no {prefix}model_index.json: not a diffusers pipeline.")
        return folder


def check_component_classes(pipeline_cls: type, folder: str, skip: typing.Iterable[str] = ()) -> None:
    """Raise ValueError if ``model_index.json`` names, for a component, a class ``pipeline_cls.__init__`` does not
    take (diffusers only logs "Expected types for ... got ..." and loads it partly random, its weights not matching).
    Modules that are not imported, nor from this package, diffusers or transformers, are left to diffusers."""
    try:
        hints = typing.get_type_hints(pipeline_cls.__init__)
    except (NameError, TypeError):
        return
    own = pipeline_cls.__module__.split(".")[0]
    for name, (module_name, class_name) in _components(folder, skip).items():
        if name not in hints or (module_name.split(".")[0] not in (own, "diffusers", "transformers")
                                 and module_name not in sys.modules):
            continue
        try:
            component_cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # diffusers names what it cannot import
        accepted = tuple(t for t in (typing.get_args(hints[name]) or (hints[name],)) if isinstance(t, type))
        if accepted and not (isinstance(component_cls, type) and issubclass(component_cls, accepted)):
            raise ValueError(
                f"{os.path.join(folder, 'model_index.json')} names {module_name}.{class_name} for {name!r}, but "
                f"{pipeline_cls.__name__} takes {' or '.join(t.__name__ for t in accepted)} there; refusing to load "
                "a component of the wrong class (its weights would not match)")
