"""FlowMoPipeline: images -> token ids -> images with FlowMo's rectified-flow decoder."""

from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.autoencoder_flowmo import FlowMoModel
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.hub import HubPipelineMixin


@dataclass
class FlowMoPipelineOutput(ImagePipelineOutput):
    """
    Output of [`FlowMoPipeline`].

    Args:
        images (`List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the decoded images.
        num_decoder_passes (`int`): decoder evaluations per image (a guided evaluation counts two); 31 for the
            paper's sampler, K for a K-pass student.
    """

    num_decoder_passes: Optional[int] = None


ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]]


class FlowMoPipeline(HubPipelineMixin, DiffusionPipeline):
    r"""
    Tokenize and reconstruct images with FlowMo.

    - `pipe.encode(images)` -> token ids `(B, num_indices)`;
    - `pipe(indices=ids)` -> images decoded from token ids;
    - `pipe(images=images)` -> reconstructions (encode then decode).

    Images follow diffusers conventions: PIL images, numpy arrays `(B, H, W, 3)` or torch tensors `(B, 3, H, W)` with
    values in [0, 1] (uint8 arrays in [0, 255] are scaled). Decoding runs [`FlowMoModel.decode`]: it integrates the
    decoder's velocity field from noise with the pipeline's scheduler; the defaults (25 steps on the t = (i/N)^4 grid,
    guidance 1.5 within the EDM-sigma interval (0.17, 1.02)) are the paper's sampler, and a distilled student's
    defaults are its K passes. Any diffusers flow-matching scheduler can replace [`FlowMoScheduler`], the diffusers
    way: `pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)`.

    `from_pretrained` takes a folder or a Hub repo id (see [`HubPipelineMixin`] for why diffusers' own download step
    cannot be used for components that live in this package).

    Args:
        autoencoder ([`FlowMoModel`]): the tokenizer.
        scheduler ([`FlowMoScheduler`] or a diffusers flow-matching scheduler): the solver (see
            `flowmo_diffusers.schedulers.flow_sampling` for which ones and how FlowMo's grid applies to them).
    """

    model_cpu_offload_seq = "autoencoder"

    def __init__(self, autoencoder: FlowMoModel, scheduler: Union[FlowMoScheduler, SchedulerMixin]):
        super().__init__()
        self.register_modules(autoencoder=autoencoder, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=autoencoder.config.patch_size, do_resize=False, do_normalize=True, do_convert_rgb=True
        )

    # ----------------------------------------------------------------------------------------------------------
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images in diffusers' formats -> float32 `(B, 3, H, W)` in [-1, 1] on the execution device, validated."""
        if images is None:
            raise ValueError("images must not be None")
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("images is an empty list")
        items = images if isinstance(images, (list, tuple)) else [images]
        converted = []
        for item in items:
            if isinstance(item, np.ndarray) and item.dtype == np.uint8:
                item = item.astype(np.float32) / 255.0
            elif isinstance(item, torch.Tensor) and item.dtype == torch.uint8:
                item = item.float() / 255.0
            elif isinstance(item, np.ndarray) and not np.issubdtype(item.dtype, np.floating):
                raise ValueError(f"numpy images must be uint8 or floating point, got dtype {item.dtype}")
            elif isinstance(item, torch.Tensor) and not item.is_floating_point():
                raise ValueError(f"torch images must be uint8 or floating point, got dtype {item.dtype}")
            elif not isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                raise ValueError(f"images must be PIL images, numpy arrays or torch tensors, got {type(item).__name__}")
            if isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[-1] not in (1, 3) and item.shape[0] == 3:
                raise ValueError(f"numpy images must be channel-last (H, W, 3), got shape {item.shape}")
            if isinstance(item, (np.ndarray, torch.Tensor)) and not (
                np.isfinite(item).all() if isinstance(item, np.ndarray) else torch.isfinite(item).all()
            ):
                raise ValueError("images contain NaN or infinite values")
            converted.append(item)
        images = converted if isinstance(images, (list, tuple)) else converted[0]
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images[None]
        if isinstance(images, torch.Tensor) and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(f"torch images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] != 3:
            raise ValueError(f"numpy images must have shape (B, H, W, 3), got {images.shape}")
        pixels = self.image_processor.preprocess(images).to(device=self._execution_device, dtype=torch.float32)
        self.autoencoder.check_images(pixels)
        if pixels.min() < -1.001 or pixels.max() > 1.001:
            raise ValueError(
                "images must have values in [0, 1] (or uint8 in [0, 255]); got range "
                f"[{float(pixels.min() / 2 + 0.5):.3f}, {float(pixels.max() / 2 + 0.5):.3f}]"
            )
        return pixels

    @torch.no_grad()
    def encode(self, images: ImageInput) -> torch.LongTensor:
        """
        Tokenize images.

        Args:
            images: PIL, numpy or torch images in [0, 1], height and width multiples of the patch size.

        Returns:
            `torch.LongTensor` of shape `(B, num_indices)`: token ids in `[0, 2**bits_per_subtoken)`, in the original
            FlowMo's order.
        """
        pixels = self.preprocess(images).to(self.autoencoder.dtype)
        return self.autoencoder.encode(pixels).indices

    def check_inputs(self, images, indices, num_inference_steps, guidance_scale, latents, height, width, output_type):
        """Validate the call's arguments before any heavy work; values (NaN, range) are checked here, at the
        boundary, so the decoder's hot path never reads tensors on the host."""
        if (images is None) == (indices is None):
            raise ValueError("pass exactly one of `images` (to reconstruct) or `indices` (to decode)")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, (int, np.integer))
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale is not None and (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float, np.integer, np.floating))
            or not np.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite real number, got {guidance_scale!r}")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        patch = self.autoencoder.config.patch_size
        if (height is not None and height % patch) or (width is not None and width % patch):
            raise ValueError(f"height and width must be multiples of patch_size {patch}, got {height}x{width}")
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.autoencoder.config.in_channels:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a tensor of shape (B, 3, H, W), got {got}")
            if not latents.is_floating_point() or not torch.isfinite(latents).all():
                raise ValueError("latents must be finite floating-point noise")

    @torch.no_grad()
    def __call__(
        self,
        images: Optional[ImageInput] = None,
        indices: Optional[torch.LongTensor] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[FlowMoPipelineOutput, tuple]:
        """
        Reconstruct images, or decode token ids.

        Args:
            images: images to reconstruct (PIL, numpy or torch in [0, 1]). Give either `images` or `indices`.
            indices (`torch.LongTensor` of shape `(B, num_indices)`): token ids to decode, as from [`encode`].
            num_inference_steps (`int`, *optional*): solver steps; defaults to the decoder's own
                (`autoencoder.config.sampling_num_inference_steps`: 25 for the paper's sampler, K for a K-pass
                student).
            guidance_scale (`float`, *optional*): classifier-free guidance on the code, `v_null + s (v_code - v_null)`,
                applied to each model evaluation inside the guidance interval; 1 disables it. Defaults to the
                decoder's own (1.5 for the paper's sampler, 1 for a distilled student).
            generator: torch generator(s) for the initial noise.
            latents (`torch.Tensor` of shape `(B, 3, H, W)`): initial noise; drawn from `generator` when None.
            height, width (`int`): output size when decoding `indices` (default `sample_size`); ignored for `images`.
            output_type (`str`): `"pil"`, `"np"` (`(B, H, W, 3)` in [0, 1]) or `"pt"` (`(B, 3, H, W)` in [0, 1]).
            return_dict (`bool`): return a [`FlowMoPipelineOutput`] rather than a tuple.

        Returns:
            [`FlowMoPipelineOutput`] with `images` and `num_decoder_passes` (decoder evaluations per image).
        """
        self.check_inputs(images, indices, num_inference_steps, guidance_scale, latents, height, width, output_type)
        model = self.autoencoder
        device = self._execution_device
        dtype = model.dtype

        if images is not None:
            pixels = self.preprocess(images)
            height, width = pixels.shape[-2:]
            code = model.encode(pixels.to(dtype)).code
        else:
            if not isinstance(indices, torch.Tensor):
                indices = torch.as_tensor(np.asarray(indices))
            code = model.indices_to_code(indices.to(device), dtype=dtype)
        batch_size = code.shape[0]
        if latents is not None and latents.shape[0] != batch_size:
            raise ValueError(f"latents must be a tensor of shape ({batch_size}, 3, H, W), got {tuple(latents.shape)}")
        if images is None:
            height = height or model.config.sample_size
            width = width or model.config.sample_size
        if latents is not None and tuple(latents.shape[-2:]) != (height, width):
            raise ValueError(f"latents must be a tensor of shape ({batch_size}, 3, {height}, {width}), got {tuple(latents.shape)}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")

        decoded = model.decode(
            code,
            num_inference_steps=None if num_inference_steps is None else int(num_inference_steps),
            guidance_scale=None if guidance_scale is None else float(guidance_scale),
            generator=generator,
            latents=latents,
            height=height,
            width=width,
            scheduler=self.scheduler,
            progress_bar=self.progress_bar,
        )
        latents = decoded.sample
        images = latents
        if output_type == "pt":
            images = images / 2 + 0.5
        else:
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FlowMoPipelineOutput(images=images, num_decoder_passes=decoded.num_decoder_passes)
