"""Options of the evaluation entry points, declared once, and the common start of their commands.

Each entry point's options are one dataclass ([`~flowmo_diffusers.evaluation.reconstruction.EvaluationConfig`],
[`~flowmo_diffusers.evaluation.sampling.SamplingConfig`],
[`~flowmo_diffusers.evaluation.generation.GenerationEvaluationConfig`]) composed of the option groups below. Every
field is the command-line flag of the same name: `transformers.HfArgumentParser` reads its type, default, choices (a
`Literal`) and help, so an option is declared in one place. `validate()` checks what a type cannot say (ranges,
combinations), naming the flag, before anything is loaded; `parse_args` and every entry function call it.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, get_args, get_origin, get_type_hints

import torch
from transformers.hf_argparser import HfArg, HfArgumentParser

from ..metrics.pretrained_weights import FID_INCEPTION_WEIGHTS, MissingPretrainedWeightsError, PretrainedWeights
from ..utils.validation import check_optional_int

if TYPE_CHECKING:
    import datasets

MixedPrecision = Literal["no", "fp16", "bf16"]
InceptionFeatureDims = Literal[64, 192, 768, 2048]

ResultT = TypeVar("ResultT")
OptionsT = TypeVar("OptionsT", bound="Options")


def check_positive(options: Any, *names: str) -> None:
    """Raise a ValueError naming the flag unless each of `options`' fields `names` is None or an integer >= 1."""
    for name in names:
        # The type through the shared check (a config built in Python may hold "8" or 8.0); the range keeps the
        # flags' own wording.
        value = check_optional_int(f"--{name}", getattr(options, name))
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")


def check_non_negative(options: Any, *names: str) -> None:
    """Raise a ValueError naming the flag unless each of `options`' fields `names` is None or an integer >= 0."""
    for name in names:
        value = check_optional_int(f"--{name}", getattr(options, name))
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be non-negative, got {value}")


def _choices(hint: Any) -> tuple | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) field accepts; None for other types."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (typing.Union, types.UnionType):  # `Literal[...] | None` is a typing.Union
        literals = [choice for arg in get_args(hint) for choice in (_choices(arg) or ())]
        if literals:
            return (*literals, None) if type(None) in get_args(hint) else tuple(literals)
    return None


@dataclass(kw_only=True)
class Options:
    """Base of the option groups and of the entry points' configs.

    [`~Options.validate`] ends with the choices of every `Literal` field; [`~Options.from_command_line`] parses a
    command line into a validated config.
    """

    #: The `--help` description of the command a config is the options of.
    command_description: ClassVar[str] = ""

    def __post_init__(self) -> None:
        pass  # the end of the groups' cooperative __post_init__ chain

    @classmethod
    def argument_parser(cls) -> HfArgumentParser:
        """The command line of this config: one flag per field (`transformers.HfArgumentParser`)."""
        return HfArgumentParser(cls, description=cls.command_description)

    @classmethod
    def from_command_line(cls: type[OptionsT], argv: Sequence[str] | None = None) -> OptionsT:
        """Parse `argv` (default `sys.argv[1:]`) into a validated config.

        Raises:
            ValueError: [`~Options.validate`] refused the settings.
        """
        # argparse's parse_args, not parse_args_into_dataclasses: that one turns an unknown flag into a ValueError
        # instead of argparse's usage error and reads a `<script>.args` file next to the script.
        options = cls(**vars(cls.argument_parser().parse_args(argv)))
        options.validate()
        return options

    def validate(self) -> None:
        """Raise a ValueError naming the flag for impossible settings (cheap checks, before anything is loaded)."""
        hints = get_type_hints(type(self))
        for field in dataclasses.fields(self):
            choices = _choices(hints[field.name])
            value = getattr(self, field.name)
            if choices is not None and value not in choices:
                listed = ", ".join(str(choice) for choice in choices if choice is not None)
                raise ValueError(f"--{field.name} must be one of {listed}; got {value!r}")


@dataclass(kw_only=True)
class HubOptions(Options):
    """Where models and datasets are downloaded from."""

    revision: str | None = HfArg(default=None, help="Hub revision of the pipeline(s).")
    cache_dir: str | None = HfArg(default=None, help="Hub / datasets cache folder.")
    hub_token: str | None = HfArg(default=None, help="Hub token (gated datasets such as ImageNet, private models).")


@dataclass(kw_only=True)
class AcceleratorOptions(Options):
    """How the pipeline runs; read by [`create_accelerator`]."""

    mixed_precision: MixedPrecision | None = HfArg(
        default=None,
        help="Autocast for the pipeline (default: Accelerate's config); the metric networks always run in float32.",
    )
    cpu: bool = HfArg(default=False, help="Run on CPU even if an accelerator is available.")


_DECODER_SAMPLER_HELP = "FlowMo decoder {} (default: the decoder's own: {} for FlowMo, {} for a distilled student)."


@dataclass(kw_only=True)
class DecoderSamplerOptions(Options):
    """The FlowMo decoder's sampler, as the tokenizer evaluation names it: `num_inference_steps`, `guidance_scale`.

    None, the default, decodes with each decoder's own sampler: the paper's 25 steps and guidance 1.5 for a trained
    FlowMo, K passes for a distilled student.
    """

    num_inference_steps: int | None = HfArg(default=None, help=_DECODER_SAMPLER_HELP.format("steps", 25, "K"))
    guidance_scale: float | None = HfArg(default=None, help=_DECODER_SAMPLER_HELP.format("guidance", 1.5, 1))

    def validate(self) -> None:
        check_positive(self, "num_inference_steps")
        super().validate()


@dataclass(kw_only=True)
class MaskGiTDecoderSamplerOptions(Options):
    """The same FlowMo decoder options under MaskGiT sampling, whose own steps and guidance take the plain names:
    `decoder_num_inference_steps`, `decoder_guidance_scale` (None: each decoder's own sampler)."""

    decoder_num_inference_steps: int | None = HfArg(
        default=None, help=_DECODER_SAMPLER_HELP.format("steps", 25, "K")
    )
    decoder_guidance_scale: float | None = HfArg(default=None, help=_DECODER_SAMPLER_HELP.format("guidance", 1.5, 1))

    def validate(self) -> None:
        check_positive(self, "decoder_num_inference_steps")
        super().validate()


@dataclass(kw_only=True)
class ImageDatasetOptions(HubOptions, abc.ABC):
    """Real images from a `datasets` dataset or an image folder; the config says which folder and split (each entry
    point names them differently, so it implements [`image_folder`] and [`resolved_split`])."""

    dataset_name: str | None = HfArg(default=None, help="datasets dataset, e.g. ILSVRC/imagenet-1k.")
    dataset_config_name: str | None = HfArg(default=None, help="Configuration of --dataset_name.")
    streaming: bool = HfArg(default=False, help="Stream the dataset instead of downloading it.")
    image_column: str | None = HfArg(default=None, help="Image column (auto-detected by default).")
    max_samples: int | None = HfArg(default=None, help="Use only the first N images (default: all).")
    dataloader_num_workers: int = HfArg(default=0, help="Decoding workers per process.")

    @abc.abstractmethod
    def image_folder(self) -> str | None:
        """The image folder (`imagefolder` builder) read when `dataset_name` is None."""

    @abc.abstractmethod
    def resolved_split(self) -> str:
        """The split that is read."""

    def validate(self) -> None:
        check_positive(self, "max_samples")
        check_non_negative(self, "dataloader_num_workers")
        super().validate()


def load_evaluation_dataset(config: ImageDatasetOptions) -> datasets.Dataset | datasets.IterableDataset:
    """Load the images named by `config` and number them (see [`~flowmo_diffusers.data.add_global_image_index`]).

    Args:
        config ([`~flowmo_diffusers.evaluation.options.ImageDatasetOptions`]):
            The dataset options of the tokenizer evaluation or of the reference statistics.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: The numbered images.
    """
    from ..data import add_global_image_index, load_image_dataset  # `datasets` is slow to import: not for --help

    dataset = load_image_dataset(
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        train_data_dir=config.image_folder(),
        split=config.resolved_split(),
        streaming=config.streaming,
        image_column=config.image_column,
        cache_dir=config.cache_dir,
        token=config.hub_token,
    )
    return add_global_image_index(dataset, config.max_samples)


@dataclass(kw_only=True)
class FeatureNetworkOptions(Options):
    """The Inception behind FID / rFID / IS (and the evaluation's other pretrained networks)."""

    inception_weights_path: str | None = HfArg(
        default=None, help=f"Local {FID_INCEPTION_WEIGHTS.file_name} (default: the torch hub cache)."
    )
    random_init_feature_networks: bool = HfArg(
        default=False,
        help="Random feature-network weights: for tests and offline smoke runs only; figures are NOT comparable.",
    )
    inception_feature_dims: InceptionFeatureDims = HfArg(
        default=2048, help="Inception features for FID; only 2048 gives published figures (smaller: quick tests)."
    )

    @property
    def comparable_to_published_results(self) -> bool:
        """Whether the feature networks are the ones every published figure uses."""
        return not self.random_init_feature_networks and self.inception_feature_dims == 2048

    def weights_files(self) -> dict[str, PretrainedWeights]:
        """`{option name: the weights its file holds}` for every weights-file option of the config."""
        return {"inception_weights_path": FID_INCEPTION_WEIGHTS}

    def validate(self) -> None:
        given = [f"--{name}" for name in self.weights_files() if getattr(self, name) is not None]
        if self.random_init_feature_networks and given:
            raise ValueError(
                f"--random_init_feature_networks was given together with weight files ({', '.join(given)}); "
                "pass one or the other"
            )
        super().validate()

    def build_metric_networks(
        self, metrics_class: Callable[..., ResultT], seed: int, script: str, **arguments: Any
    ) -> ResultT:
        """`metrics_class(...)` with these options, random networks drawn from `seed`, missing weights explained.

        Every process must hold the *same* random networks, otherwise the summed feature statistics would mix
        different feature spaces (and two runs with the same seed would differ).

        Args:
            metrics_class (`type`):
                [`~flowmo_diffusers.metrics.ReconstructionMetrics`] or [`~flowmo_diffusers.metrics.GenerationMetrics`]
                (it reads the pretrained weights unless `random_init_feature_networks`).
            seed (`int`):
                Seed of the random networks.
            script (`str`):
                The command whose flags the error for missing weights names.
            arguments (`dict[str, Any]`, *optional*):
                The metrics' other arguments (`device`, ...).

        Returns:
            The metrics.

        Raises:
            MissingPretrainedWeightsError: A pretrained network's weights are missing; the message adds the flag.
        """
        arguments.update(
            random_init=self.random_init_feature_networks,
            inception_weights_path=self.inception_weights_path,
            inception_feature_dims=self.inception_feature_dims,
        )
        if self.random_init_feature_networks:
            with torch.random.fork_rng(devices=[]):  # initialised on the CPU; leave the caller's RNG alone
                torch.manual_seed(seed)
                return metrics_class(**arguments)
        try:
            return metrics_class(**arguments)
        except MissingPretrainedWeightsError as error:
            # The metrics package names its Python options; a command-line user needs the flag.
            flags = [f"--{name}" for name, weights in self.weights_files().items() if weights.file_name in str(error)]
            hint = f"pass {' / '.join(flags)} /path/to/file" if flags else "pass the weight file options"
            raise MissingPretrainedWeightsError(
                f"{error}\nWith {script}: {hint}, or put the file in the torch hub cache. For a smoke test without "
                "any pretrained network, pass --random_init_feature_networks (the figures are then not comparable to "
                "anything)."
            ) from error


@dataclass(kw_only=True)
class ResumeOptions(Options):
    """Resumable evaluation: partial state saved every few batches, refusals of mismatched reruns (docs/evaluation.md)."""

    resume_every_batches: int = HfArg(
        default=20,
        help="Save each process' partial metric state every N batches; a rerun with the same arguments continues "
        "from it.",
    )
    overwrite: bool = HfArg(
        default=False,
        help="Discard finished results or partial state of other arguments in --output_dir instead of refusing.",
    )

    def validate(self) -> None:
        check_positive(self, "resume_every_batches")
        super().validate()


def _has_accelerator_device() -> bool:
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... alike
    if api is not None and hasattr(api, "is_available"):
        return bool(api.is_available())
    return torch.cuda.is_available()


def create_accelerator(options: AcceleratorOptions):
    """An `accelerate.Accelerator` that is distributed whenever the launcher started several processes.

    `accelerate launch --multi_gpu` and `torchrun` set `WORLD_SIZE`; on a machine without an accelerator device,
    Accelerate only builds a (gloo) process group when asked for the CPU, and otherwise silently runs every process
    as an independent single process (each would evaluate the whole dataset). So the CPU is selected automatically in
    that case, and a mismatch between `WORLD_SIZE` and the resulting number of processes is an error rather than a
    silently duplicated evaluation.

    Args:
        options ([`AcceleratorOptions`]):
            `mixed_precision` and `cpu`.

    Returns:
        `accelerate.Accelerator`: The run's accelerator.
    """
    from accelerate import Accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = options.cpu or (world_size > 1 and not _has_accelerator_device())
    accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=use_cpu)
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"The launcher started {world_size} processes (WORLD_SIZE) but Accelerate formed a group of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); every process would evaluate the whole "
            "dataset. Launch with `accelerate launch --multi_gpu --num_processes N ...` (add --cpu to the script "
            "on machines without GPUs) or `torchrun --nproc_per_node N ...`."
        )
    return accelerator


def start_command(parse_args: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None):
    """The common start of the evaluation scripts (evaluate, sample, evaluate_generation).

    Logging, the parsed config (a ValueError from `parse_args` becomes a one-line error exit), the accelerator of
    [`create_accelerator`], and non-main processes quieted to errors so that every message appears once.

    Args:
        parse_args (`Callable`):
            The script's `parse_args(argv)`.
        argv (`Sequence[str]`, *optional*, defaults to `sys.argv[1:]`):
            The command line.

    Returns:
        `tuple`: `(config, accelerator)`.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    accelerator = create_accelerator(config)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    return config, accelerator


__all__ = [
    "AcceleratorOptions",
    "DecoderSamplerOptions",
    "FeatureNetworkOptions",
    "HubOptions",
    "ImageDatasetOptions",
    "MaskGiTDecoderSamplerOptions",
    "Options",
    "ResumeOptions",
    "check_non_negative",
    "check_positive",
    "create_accelerator",
    "load_evaluation_dataset",
    "start_command",
]
