"""What the demo page (`examples/demo/app.py`) shows for one image, computed without any UI: the token ids and their
bits per pixel, the reconstruction by the paper sampler and by fast decoders (diffusers' flow solvers with fewer
passes, a distilled student), the wall time of each, and the per-pixel variance of several reconstructions.

```python
from flowmo_diffusers import FlowMoPipeline
from flowmo_diffusers.pipelines.demo import FastDecoder, reconstruct_for_demo

pipe = FlowMoPipeline.from_pretrained("outputs/train_flowmo")
result = reconstruct_for_demo(pipe, image, fast_decoders=[FastDecoder("dpm", 4)], num_variance_samples=4)
result.bits_per_pixel, result.indices, [(r.name, r.num_decoder_passes, r.seconds) for r in result.reconstructions]
```

Every decoder decodes the same token ids from the same initial noise (drawn from `seed`), so the images differ only by
the decoder. The loaded pipeline is never changed: each solver runs in a [`FlowMoPipeline`] of its own around the
same autoencoder (no weights are copied).
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ..models.configuration_flowmo import bits_per_pixel
from ..models.modeling_utils import MAX_INFERENCE_STEPS
from ..utils.images import to_rgb
from ..utils.validation import check_int
from .pipeline_flowmo import FlowMoPipeline
from .variance import per_pixel_variance

#: The most reconstructions the variance map may be drawn from (each costs a full paper-sampler decode).
MAX_VARIANCE_SAMPLES = 64

# UniPC and DPM-Solver integrate a velocity only in their flow mode (`flowmo_diffusers.schedulers.flow_sampling`).
_FLOW_MODE = dict(prediction_type="flow_prediction", use_flow_sigmas=True)

#: The training-free fast solvers offered, by key: (label, diffusers scheduler class, constructor arguments).
SOLVERS = {
    "euler": ("Euler", FlowMatchEulerDiscreteScheduler, {}),
    "unipc": ("UniPC", UniPCMultistepScheduler, _FLOW_MODE),
    "dpm": ("DPM-Solver++", DPMSolverMultistepScheduler, _FLOW_MODE),
    "heun": ("Heun", FlowMatchHeunDiscreteScheduler, {}),
}


@dataclass(frozen=True)
class FastDecoder:
    """
    A training-free fast decoder: one of diffusers' flow solvers with few steps, guided like the paper sampler.

    Args:
        solver (`str`): a key of [`SOLVERS`]: `"euler"`, `"unipc"`, `"dpm"` (DPM-Solver++) or `"heun"`.
        num_inference_steps (`int`): solver steps (Heun evaluates the decoder 2N - 1 times; a guided evaluation
            costs two decoder passes).
    """

    solver: str
    num_inference_steps: int

    @property
    def name(self) -> str:
        return f"{SOLVERS[self.solver][0]} {self.num_inference_steps} steps"

    def scheduler(self):
        """A fresh scheduler for this solver (FlowMo's grid and guidance interval are applied at decode time)."""
        _, scheduler_class, kwargs = SOLVERS[self.solver]
        return scheduler_class(**kwargs)


@dataclass
class Reconstruction:
    """
    One decoder's reconstruction.

    Args:
        name (`str`): what decoded it, e.g. `"paper sampler (25 steps, guidance 1.5)"`.
        image (`PIL.Image.Image`): the reconstruction, at the model's `sample_size`.
        num_decoder_passes (`int`): decoder evaluations per image (a guided evaluation counts two).
        seconds (`float`): wall time of the decode (the ids were already there).
    """

    name: str
    image: PIL.Image.Image
    num_decoder_passes: int
    seconds: float


@dataclass
class DemoResult:
    """
    Everything the demo page shows for one image ([`reconstruct_for_demo`]).

    Args:
        image (`PIL.Image.Image`): the input as the model saw it: RGB, center-cropped and resized to `sample_size`.
        indices (`torch.LongTensor` of shape `(num_indices,)`): its token ids, on the CPU.
        bits_per_index (`int`): bits of each id (`bits_per_subtoken`).
        bits_per_pixel (`float`): bits of all ids per image pixel (`num_indices * bits_per_index / sample_size**2`).
        encode_seconds (`float`): wall time of the encoding.
        reconstructions (`List[Reconstruction]`): the paper sampler first, then each fast decoder, then the student.
        variance (`np.ndarray` of shape `(H, W)`, float32, or `None`): per-pixel variance (mean over RGB, pixel
            values in [0, 1]) of `num_variance_samples` paper-sampler reconstructions from different noise; `None`
            when `num_variance_samples` is 0.
        num_variance_samples (`int`): reconstructions behind `variance` (0: none drawn).
        variance_seconds (`float` or `None`): wall time of those reconstructions, all in one batch.
    """

    image: PIL.Image.Image
    indices: torch.LongTensor
    bits_per_index: int
    bits_per_pixel: float
    encode_seconds: float
    reconstructions: list[Reconstruction]
    variance: np.ndarray | None
    num_variance_samples: int
    variance_seconds: float | None

    def variance_image(self) -> PIL.Image.Image | None:
        """The variance map as an 8-bit grayscale image, white = the highest variance of this image (a map that is
        zero everywhere is black); `None` without a variance."""
        if self.variance is None:
            return None
        peak = float(self.variance.max())
        scaled = self.variance / peak if peak > 0 else np.zeros_like(self.variance)
        return PIL.Image.fromarray((scaled * 255).round().clip(0, 255).astype(np.uint8))  # 2-D uint8: mode "L"

    def timings(self) -> list[list]:
        """Rows `[what, decoder passes per image, milliseconds]`: the encoding, every reconstruction and the variance
        batch (its passes counted over all its samples)."""
        rows = [["encode (token ids)", 0, round(self.encode_seconds * 1000, 1)]]
        rows += [[r.name, r.num_decoder_passes, round(r.seconds * 1000, 1)] for r in self.reconstructions]
        if self.variance_seconds is not None:
            passes = self.reconstructions[0].num_decoder_passes * self.num_variance_samples
            rows.append([f"variance: {self.num_variance_samples} paper-sampler samples", passes,
                         round(self.variance_seconds * 1000, 1)])
        return rows

    def indices_text(self, per_line: int = 32) -> str:
        """The token ids as text, `per_line` ids a line."""
        ids = [str(int(i)) for i in self.indices]
        return "\n".join(" ".join(ids[start : start + per_line]) for start in range(0, len(ids), per_line))


def prepare_image(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """
    An uploaded image -> the RGB `resolution` x `resolution` square the model reads.

    The package's one RGB conversion ([`~flowmo_diffusers.utils.images.to_rgb`]: EXIF orientation, transparency onto
    white, 16-bit rounded), then PIL's resize-and-center-crop (`ImageOps.fit`, bilinear): the same framing as the
    evaluation's `data.ImageTransform`, which pipelines may not import (and which needs torchvision).

    Args:
        image (`PIL.Image.Image`): any size and mode.
        resolution (`int`): the side of the result.

    Returns:
        `PIL.Image.Image`: RGB, `resolution` x `resolution`.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {image.width}x{image.height}")
    return PIL.ImageOps.fit(to_rgb(image), (resolution, resolution), method=PIL.Image.BILINEAR)


def enlarge(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """`image` scaled up by the largest whole factor that keeps its longer side at most `size` (nearest neighbour,
    so a 32x32 reconstruction shows its pixels instead of a blur); an image already that large is returned as is."""
    factor = max(1, size // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)


def _check_fast_decoders(fast_decoders) -> list[FastDecoder]:
    if isinstance(fast_decoders, (str, FastDecoder)) or not isinstance(fast_decoders, Sequence):
        raise TypeError(
            "fast_decoders must be a list of FastDecoder or (solver, num_inference_steps) pairs, got "
            f"{type(fast_decoders).__name__}"
        )
    checked = []
    for entry in fast_decoders:
        solver, steps = (entry.solver, entry.num_inference_steps) if isinstance(entry, FastDecoder) else (
            entry if isinstance(entry, (tuple, list)) and len(entry) == 2 else (None, None)
        )
        if solver is None:
            raise TypeError(f"fast_decoders entries must be FastDecoder or (solver, num_inference_steps), got {entry!r}")
        if solver not in SOLVERS:
            raise ValueError(f"fast_decoders: unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
        steps = check_int(f"fast_decoders: num_inference_steps of {solver}", steps, 1, MAX_INFERENCE_STEPS)
        checked.append(FastDecoder(solver, steps))
    return checked


def _check_student(pipeline: FlowMoPipeline, student) -> None:
    if student is None:
        return
    if not isinstance(student, FlowMoPipeline):
        raise TypeError(f"student must be a FlowMoPipeline (a distilled decoder), got {type(student).__name__}")
    keys = ("code_length", "context_dim", "bits_per_subtoken", "sample_size")
    ours = {key: pipeline.autoencoder.config[key] for key in keys}
    theirs = {key: student.autoencoder.config[key] for key in keys}
    if ours != theirs:
        raise ValueError(
            f"student reads another token format than the pipeline ({theirs} vs {ours}): it cannot decode the "
            "pipeline's ids; pass a student distilled from this pipeline"
        )


def _timed_decode(pipeline: FlowMoPipeline, indices: torch.Tensor, seed: int, **kwargs) -> tuple:
    """`(PIL image, decoder passes, seconds)` of decoding `indices` from the noise of `seed`."""
    start = time.perf_counter()
    # output_type="pil" copies the result to the host, so the time includes any queued device work.
    out = pipeline(indices=indices, generator=torch.Generator().manual_seed(seed), output_type="pil", **kwargs)
    return out.images[0], out.num_decoder_passes, time.perf_counter() - start


def _with_scheduler(pipeline: FlowMoPipeline, scheduler) -> FlowMoPipeline:
    """A pipeline around the same autoencoder with another scheduler (the caller's pipeline stays as it is)."""
    other = FlowMoPipeline(autoencoder=pipeline.autoencoder, scheduler=scheduler)
    other.set_progress_bar_config(disable=True)
    return other


@torch.no_grad()
def reconstruct_for_demo(
    pipeline: FlowMoPipeline,
    image: PIL.Image.Image,
    fast_decoders: Sequence[FastDecoder | tuple[str, int]] = (),
    student: FlowMoPipeline | None = None,
    seed: int = 0,
    num_variance_samples: int = 4,
) -> DemoResult:
    r"""
    Tokenize one image and reconstruct it with the paper sampler, each fast decoder and a student, timing each.

    Args:
        pipeline ([`FlowMoPipeline`]):
            the tokenizer (not a distilled student: its own sampler is the paper sampler shown first).
        image (`PIL.Image.Image`):
            any size and mode; center-cropped and resized to the model's `sample_size` ([`prepare_image`]).
        fast_decoders (`List[FastDecoder]` or `List[Tuple[str, int]]`, *optional*, defaults to none):
            training-free solvers to decode the same ids with, e.g. `[("dpm", 4), ("euler", 8)]`.
        student ([`FlowMoPipeline`], *optional*):
            a distilled K-pass decoder of the same token format; it decodes with its own defaults.
        seed (`int`, *optional*, defaults to 0):
            the initial noise of every reconstruction; variance sample k uses `seed + k`.
        num_variance_samples (`int`, *optional*, defaults to 4):
            paper-sampler reconstructions behind the variance map: 0 for none, else 2 to [`MAX_VARIANCE_SAMPLES`].

    Returns:
        [`DemoResult`].
    """
    # Every argument is checked before the first decoder pass.
    if not isinstance(pipeline, FlowMoPipeline):
        raise TypeError(f"pipeline must be a FlowMoPipeline, got {type(pipeline).__name__}")
    config = pipeline.autoencoder.config
    if config.distilled_from is not None:
        raise ValueError(
            f"pipeline is a distilled student (of {config.distilled_from!r}), whose sampler is not the paper's: pass "
            "the teacher as pipeline and the student as student"
        )
    fast_decoders = _check_fast_decoders(fast_decoders)
    _check_student(pipeline, student)
    seed = check_int("seed", seed, 0, 2**63 - 1 - MAX_VARIANCE_SAMPLES)
    num_variance_samples = check_int("num_variance_samples", num_variance_samples, 0, MAX_VARIANCE_SAMPLES)
    if num_variance_samples == 1:
        raise ValueError("num_variance_samples must be 0 (no variance map) or at least 2, got 1")
    resolution = config.sample_size
    image = prepare_image(image, resolution)

    start = time.perf_counter()
    indices = pipeline.encode(image).cpu()  # (1, num_indices)
    encode_seconds = time.perf_counter() - start

    # The paper sampler: FlowMoScheduler on this decoder's grid, its configured steps and guidance.
    paper = _with_scheduler(pipeline, pipeline.autoencoder.sampling_scheduler())
    paper_name = (
        f"paper sampler ({config.sampling_num_inference_steps} steps, guidance {config.sampling_guidance_scale:g})"
    )
    reconstructions = [Reconstruction(paper_name, *_timed_decode(paper, indices, seed))]
    for decoder in fast_decoders:
        solver_pipeline = _with_scheduler(pipeline, decoder.scheduler())
        decoded = _timed_decode(solver_pipeline, indices, seed, num_inference_steps=decoder.num_inference_steps)
        reconstructions.append(Reconstruction(decoder.name, *decoded))
    if student is not None:
        student.set_progress_bar_config(disable=True)
        decoded = _timed_decode(student, indices, seed)
        kind = "distilled student" if student.autoencoder.config.distilled_from is not None else "student"
        reconstructions.append(Reconstruction(f"{kind} ({decoded[1]} passes)", *decoded))

    variance, variance_seconds = None, None
    if num_variance_samples:
        generators = [torch.Generator().manual_seed(seed + k) for k in range(num_variance_samples)]
        start = time.perf_counter()
        samples = paper(
            indices=indices, num_images_per_prompt=num_variance_samples, generator=generators, output_type="np"
        ).images
        variance_seconds = time.perf_counter() - start
        variance = per_pixel_variance(samples, num_variance_samples)[0]

    return DemoResult(
        image=image,
        indices=indices[0],
        bits_per_index=config.bits_per_subtoken,
        bits_per_pixel=bits_per_pixel(config, resolution),
        encode_seconds=encode_seconds,
        reconstructions=reconstructions,
        variance=variance,
        num_variance_samples=num_variance_samples,
        variance_seconds=variance_seconds,
    )


__all__ = [
    "MAX_VARIANCE_SAMPLES",
    "SOLVERS",
    "DemoResult",
    "FastDecoder",
    "Reconstruction",
    "enlarge",
    "prepare_image",
    "reconstruct_for_demo",
]
