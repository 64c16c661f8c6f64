"""FlowMoPipeline: images -> token ids -> images with FlowMo's rectified-flow decoder."""

from typing import List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.autoencoder_flowmo import FlowMoModel
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.hub import HubPipelineMixin

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]]


class FlowMoPipeline(HubPipelineMixin, DiffusionPipeline):
    r"""
    Tokenize and reconstruct images with FlowMo.

    - `pipe.encode(images)` -> token ids `(B, num_indices)`;
    - `pipe(indices=ids)` -> images decoded from token ids;
    - `pipe(images=images)` -> reconstructions (encode then decode).

    Images follow diffusers conventions: PIL images, numpy arrays `(B, H, W, 3)` or torch tensors `(B, 3, H, W)` with
    values in [0, 1] (uint8 arrays in [0, 255] are scaled). Decoding integrates the decoder's velocity field with
    [`FlowMoScheduler`] from noise; the defaults (25 steps on the t = (i/N)^4 grid, guidance 1.5 within the EDM-sigma
    interval (0.17, 1.02)) are the paper's sampler.

    `from_pretrained` takes a folder or a Hub repo id (see [`HubPipelineMixin`] for why diffusers' own download step
    cannot be used for components that live in this package).

    Args:
        autoencoder ([`FlowMoModel`]): the tokenizer.
        scheduler ([`FlowMoScheduler`]): the sampler.
    """

    model_cpu_offload_seq = "autoencoder"

    def __init__(self, autoencoder: FlowMoModel, scheduler: FlowMoScheduler):
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

    def _prepare_latents(self, batch_size, height, width, generator, latents, device) -> torch.Tensor:
        shape = (batch_size, self.autoencoder.config.in_channels, height, width)
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {shape}, got {got}")
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise ValueError("latents must be finite floating-point noise")
        return latents.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        images: Optional[ImageInput] = None,
        indices: Optional[torch.LongTensor] = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.5,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """
        Reconstruct images, or decode token ids.

        Args:
            images: images to reconstruct (PIL, numpy or torch in [0, 1]). Give either `images` or `indices`.
            indices (`torch.LongTensor` of shape `(B, num_indices)`): token ids to decode, as from [`encode`].
            num_inference_steps (`int`): Euler steps (25 in the paper).
            guidance_scale (`float`): classifier-free guidance on the code, `v_null + s (v_code - v_null)`, applied
                within the scheduler's guidance interval; 1 disables it.
            generator: torch generator(s) for the initial noise.
            latents (`torch.Tensor` of shape `(B, 3, H, W)`): initial noise; drawn from `generator` when None.
            height, width (`int`): output size when decoding `indices` (default `sample_size`); ignored for `images`.
            output_type (`str`): `"pil"`, `"np"` (`(B, H, W, 3)` in [0, 1]) or `"pt"` (`(B, 3, H, W)` in [0, 1]).
            return_dict (`bool`): return an [`ImagePipelineOutput`] rather than a tuple.

        Returns:
            [`ImagePipelineOutput`] with `images`.
        """
        if (images is None) == (indices is None):
            raise ValueError("pass exactly one of `images` (to reconstruct) or `indices` (to decode)")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
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
            height = height or model.config.sample_size
            width = width or model.config.sample_size
            patch = model.config.patch_size
            if height % patch or width % patch:
                raise ValueError(f"height and width must be multiples of patch_size {patch}, got {height}x{width}")
        batch_size = code.shape[0]

        latents = self._prepare_latents(batch_size, height, width, generator, latents, device)
        # RoPE tables depend only on the image size: build them once, not once per step.
        rotary_emb = model.decoder_rotary_embedding(height, width, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        use_guidance = guidance_scale != 1.0
        keep_and_drop = torch.cat([torch.ones(batch_size, device=device), torch.zeros(batch_size, device=device)])

        for index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            flow_time = self.scheduler.sigmas[index]
            model_input = latents.to(dtype)
            if use_guidance and self.scheduler.is_guidance_step(flow_time):
                # Code and null-code passes share one batched forward.
                velocity = model(
                    torch.cat([model_input, model_input]),
                    flow_time.expand(2 * batch_size),
                    torch.cat([code, code]),
                    code_mask=keep_and_drop,
                    rotary_emb=rotary_emb,
                ).sample.float()
                velocity_code, velocity_null = velocity.chunk(2)
                velocity = velocity_null + guidance_scale * (velocity_code - velocity_null)
            else:
                velocity = model(model_input, flow_time.expand(batch_size), code, rotary_emb=rotary_emb).sample
            latents = self.scheduler.step(velocity, timestep, latents).prev_sample

        images = latents.clamp(-1, 1)
        if output_type == "pt":
            images = images / 2 + 0.5
        else:
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
