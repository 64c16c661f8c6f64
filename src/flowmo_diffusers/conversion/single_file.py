"""`from_single_file`: the original FlowMo `.pth` (local, or a file on the Hub) straight into a model or pipeline.

The names follow diffusers' `FromOriginalModelMixin` (models) and `FromSingleFileMixin` (pipelines); the work is
done by the converter (`flowmo_diffusers.conversion.original`), so the result is what
`scripts/convert_flowmo_original_to_diffusers.py` writes: the same `torch.load(..., weights_only=True)`, the same
EMA choice and the same errors naming missing, unexpected or mis-shaped keys.

The converter imports the models, so it is imported inside the methods (the models import this module).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

__all__ = ["FromOriginalModelMixin", "FromSingleFileMixin", "download_single_file", "parse_single_file_link"]

# The huggingface_hub download options of `from_single_file`, as diffusers names them.
_HUB_ARGUMENTS = ("cache_dir", "token", "revision", "local_files_only", "force_download")


_HUB_URL_RE = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<revision>[^/]+)/(?P<file>.+)$"
)
_HUB_SHORT_RE = re.compile(r"^(?P<repo>[^/:]+/[^/]+)/(?P<file>[^:]+)$")


def parse_single_file_link(link: str) -> tuple[str, str, str | None]:
    """`(repo_id, filename, revision)` of a file on the Hub given as a link.

    Accepted: `https://huggingface.co/<namespace>/<name>/blob/<revision>/<path>` (also `/resolve/`, `hf.co`,
    without the scheme; a `revision` such as `refs%2Fpr%2F1` is unquoted), and `<namespace>/<name>/<path>`
    (revision `None`: the caller's `revision` or `main`).

    Written here because diffusers' own parser (`_extract_repo_id_and_weights_name` in
    `diffusers.loaders.single_file_utils`) is private and only understands `blob/main`: a link to another
    branch or a commit would silently load `main`.
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
) -> str:
    """Local path of one file: `link_or_path` itself when it is a local file, else the Hub file it links to
    (see :func:`parse_single_file_link`), downloaded with `hf_hub_download` into the huggingface_hub cache
    (`cache_dir`), so a second call, `local_files_only=True` or `HF_HUB_OFFLINE=1` reuse it.

    `revision` applies to `<namespace>/<name>/<file>` links; a `blob/<revision>` link carries its own, and
    giving a different `revision` too is an error.
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
    where = f"'{filename}' of '{repo_id}'" + (f" (revision '{revision}')" if revision else "")
    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=bool(local_files_only), force_download=force_download,
        )
    except LocalEntryNotFoundError as e:
        reason = "offline mode is enabled (HF_HUB_OFFLINE=1)" if hf_constants.HF_HUB_OFFLINE else (
            "local_files_only=True" if local_files_only else "the Hub could not be reached")
        raise LocalEntryNotFoundError(f"Cannot load {where}: it is not in the local cache and {reason}.") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        if hasattr(e, "append_to_message"):
            e.append_to_message(f"\n{path!r} is not a local file, and {where} could not be found on the Hub.")
        raise


def _resolve_original_config(original_config: Any, hub_kwargs: Mapping[str, Any]) -> Any:
    """A `config.yaml` given as a path or a Hub link -> a local path (a parsed dict is returned as is)."""
    if original_config is None or isinstance(original_config, Mapping):
        return original_config
    return download_single_file(original_config, **hub_kwargs)


def _load_original_model(
    model_class: type,
    pretrained_model_link_or_path: str | os.PathLike,
    preset: str | None,
    original_config: Any,
    config: Mapping[str, Any] | None,
    original_dit_base: Mapping[str, Any] | None,
    extract_ema: bool,
    torch_dtype: torch.dtype | None,
    hub_kwargs: Mapping[str, Any],
):
    from .original import convert_original_checkpoint

    if sum(option is not None for option in (preset, original_config, config)) != 1:
        raise ValueError(
            "from_single_file needs exactly one of preset= ('flowmo-lo', 'flowmo-hi', ...), original_config= (the "
            "original trainer's config.yaml: a path, a Hub link or its parsed dict) or config= (a FlowMoModel "
            f"config dict); got preset={preset!r}, original_config={original_config!r}, config={config!r}"
        )
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")
    checkpoint = download_single_file(pretrained_model_link_or_path, **hub_kwargs)
    model, source = convert_original_checkpoint(
        checkpoint,
        preset=preset,
        original_config=original_config,
        dit_base=original_dit_base,
        config=config,
        prefer_ema=extract_ema,
        dtype=torch_dtype or torch.float32,
        model_class=model_class,
    )
    logger.info("loaded %s from %s (%s)", model_class.__name__, checkpoint, source)
    return model


class FromOriginalModelMixin:
    """Adds `from_single_file` to [`FlowMoModel`]: load an original-format checkpoint without a conversion step."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        *,
        preset: str | None = None,
        original_config: Any = None,
        config: Mapping[str, Any] | None = None,
        original_dit_base: Mapping[str, Any] | None = None,
        extract_ema: bool = True,
        torch_dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
    ):
        r"""
        Build the model from an original FlowMo checkpoint (`flowmo_lo.pth`, `flowmo_hi.pth` or a training run's
        `.pth`).

        Args:
            pretrained_model_link_or_path (`str` or `os.PathLike`):
                A local `.pth`, a Hub file link `https://huggingface.co/<namespace>/<name>/blob/<revision>/<file>`,
                or `<namespace>/<name>/<file>`. Hub files are downloaded with `huggingface_hub.hf_hub_download` into
                its cache.
            preset (`str`, *optional*):
                A named configuration (`"flowmo-lo"`, `"flowmo-hi"`). Give exactly one of `preset`,
                `original_config` and `config`.
            original_config (`str`, `os.PathLike` or `dict`, *optional*):
                The `config.yaml` the original trainer wrote (a path, a Hub file link, or its parsed contents).
            config (`dict`, *optional*):
                A [`FlowMoModel`] config.
            original_dit_base (`dict`, *optional*):
                The original's `DIT_ZOO["dit_b_4"]` entry, for forks that changed it (with `original_config`).
            extract_ema (`bool`, *optional*, defaults to `True`):
                Use the EMA weights (`model_ema_state_dict`) when the checkpoint has them, as the paper's evaluation
                does; `False` takes `model_state_dict`.
            torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
                The weights' dtype.
            cache_dir (`str` or `os.PathLike`, *optional*):
                huggingface_hub cache folder for Hub files.
            token (`str` or `bool`, *optional*):
                Hub token (`True`: the one saved by `hf auth login`).
            revision (`str`, *optional*, defaults to `"main"`):
                Branch, tag or commit for `<namespace>/<name>/<file>` links (a `blob/<revision>` link has its own).
            local_files_only (`bool`, *optional*):
                Only use files already in the cache (also implied by `HF_HUB_OFFLINE=1`).
            force_download (`bool`, *optional*, defaults to `False`):
                Download again even if cached.

        Raises:
            `CheckpointConversionError`: the checkpoint does not match the configuration (naming every missing,
                unexpected or mis-shaped key), or (`UnsafeCheckpointError`) it holds pickled non-tensor objects.

        Returns:
            The model in eval mode.
        """
        hub_kwargs = dict(zip(_HUB_ARGUMENTS, (cache_dir, token, revision, local_files_only, force_download)))
        return _load_original_model(
            cls, pretrained_model_link_or_path, preset, _resolve_original_config(original_config, hub_kwargs),
            config, original_dit_base, extract_ema, torch_dtype, hub_kwargs,
        )


class FromSingleFileMixin:
    """Adds `from_single_file` to [`FlowMoPipeline`]: an original-format checkpoint straight into a pipeline."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        *,
        original_config: Any = None,
        scheduler=None,
        **kwargs,
    ):
        r"""
        Build the pipeline from an original FlowMo checkpoint, as `scripts/convert_flowmo_original_to_diffusers.py`
        does (same weights, bit for bit), without writing a folder first.

        Takes the arguments of [`FlowMoModel.from_single_file`] (by keyword), plus:

        Args:
            scheduler ([`FlowMoScheduler`] or another flow-matching scheduler, *optional*):
                Use this scheduler. By default a [`FlowMoScheduler`] with the sampler of `original_config`
                (`eval.sampling`), or the paper's sampler for a `preset` or `config`.

        Returns:
            The pipeline, on the CPU.
        """
        from .original import scheduler_config_from_original

        hub_kwargs = {key: kwargs[key] for key in _HUB_ARGUMENTS if key in kwargs}
        original_config = _resolve_original_config(original_config, hub_kwargs)
        model_class, scheduler_class = cls._single_file_component_classes()
        autoencoder = model_class.from_single_file(pretrained_model_link_or_path, original_config=original_config, **kwargs)
        if scheduler is None:
            scheduler_config = scheduler_config_from_original(original_config) if original_config is not None else {}
            scheduler = scheduler_class(**scheduler_config)
        return cls(autoencoder=autoencoder, scheduler=scheduler)

    @classmethod
    def _single_file_component_classes(cls):
        """The autoencoder and scheduler classes the pipeline is built with (overridable by subclasses)."""
        from ..models.autoencoder_flowmo import FlowMoModel
        from ..schedulers.scheduling_flowmo import FlowMoScheduler

        return FlowMoModel, FlowMoScheduler
