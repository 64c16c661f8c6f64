"""FlowMoPipeline: images -> token ids -> images with FlowMo's rectified-flow decoder."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..conversion.single_file import FromSingleFileMixin
from ..models.autoencoder_flowmo import FlowMoModel
from ..models.modeling_utils import MAX_IMAGE_SIZE_FACTOR, check_decode_bounds, resolve_max_image_size
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.files import FollowUmaskSaveMixin
from ..utils.hub import HubPipelineMixin
from ..utils.images import check_unit_range, sixteen_bit_to_eight_bit, to_rgb
from ..utils.validation import as_integer_tensor, check_int
from . import pipeline_utils
from .pipeline_utils import SamplingStateMixin, SharesSamplingSchedulerMixin, StepEndCallback

#: With tiling on, the default bound of an image's height and width: this many times `sample_size`.
TILED_MAX_IMAGE_SIZE_FACTOR = 64


@dataclass
class FlowMoPipelineOutput(ImagePipelineOutput):
    """
    Output of [`FlowMoPipeline`].

    Args:
        images (`List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the decoded images.
        num_decoder_passes (`int`): decoder evaluations per image (a guided evaluation counts two); 31 for the
            paper's sampler, K for a K-pass student.
    """

    num_decoder_passes: int | None = None


ImageInput = (
    PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray] | list[torch.Tensor]
)


class FlowMoPipeline(
    SharesSamplingSchedulerMixin,
    HubPipelineMixin,
    FollowUmaskSaveMixin,
    FromSingleFileMixin,
    SamplingStateMixin,
    DiffusionPipeline,
):
    r"""
    Tokenize and reconstruct images with FlowMo.

    - `pipe.encode(images)` -> token ids `(B, num_indices)`;
    - `pipe(indices=ids)` -> images decoded from token ids;
    - `pipe(images=images)` -> reconstructions (encode then decode);
    - `pipe(images=images, num_images_per_prompt=8)` -> 8 reconstructions of each image, each from its own noise
      (the decoder is a diffusion model: [`per_pixel_variance`] shows where they differ).

    Images follow diffusers conventions: PIL images, numpy arrays `(B, H, W, 3)` or torch tensors `(B, 3, H, W)` with
    values in [0, 1] (uint8 arrays in [0, 255] are scaled). Decoding runs [`FlowMoModel.decode`]'s sampler: it
    integrates the decoder's velocity field from noise with the pipeline's scheduler; the defaults (25 steps on the
    t = (i/N)^4 grid, guidance 1.5 within the EDM-sigma interval (0.17, 1.02)) are the paper's sampler, and a
    distilled student's defaults are its K passes. Any diffusers flow-matching scheduler can replace
    [`FlowMoScheduler`], the diffusers way:
    `pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)`.

    `from_pretrained` takes a folder or a Hub repo id (see [`HubPipelineMixin`] for why diffusers' own download step
    cannot be used for components that live in this package); `from_single_file` takes the paper's original `.pth`
    (a path or a Hub file link, see [`FromSingleFileMixin`]).

    Args:
        autoencoder ([`FlowMoModel`]): the tokenizer.
        scheduler ([`FlowMoScheduler`] or a diffusers flow-matching scheduler): the solver (see
            `flowmo_diffusers.schedulers.flow_sampling` for which ones and how FlowMo's grid applies to them).
    """

    model_cpu_offload_seq = "autoencoder"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, autoencoder: FlowMoModel, scheduler: FlowMoScheduler | SchedulerMixin):
        super().__init__()
        self.register_modules(autoencoder=autoencoder, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=autoencoder.config.patch_size, do_resize=False, do_normalize=True, do_convert_rgb=True
        )

    # ----------------------------------------------------------------------------------------------------------
    # diffusers' sampling state (SamplingStateMixin) is that of the solver loop: `num_timesteps` counts solver steps,
    # `num_inference_steps` for Euler-type solvers and 2N - 1 for Heun.

    def _progress_over_timesteps(self, timesteps):
        # The solver loop lives in FlowMoModel.decode_unchecked, which hands its timesteps to this wrapper before the
        # first step: the one moment the pipeline sees the grid, so `num_timesteps` is known to every callback
        # (diffusers sets it before its loop too).
        self._num_timesteps = len(timesteps)
        return self.progress_bar(timesteps)

    # ----------------------------------------------------------------------------------------------------------
    def enable_tiling(self, **kwargs) -> None:
        """Encode, reconstruct and decode images of any size at least one tile large as a grid of overlapping
        tiles ([`FlowMoModel.enable_tiling`], same arguments). `encode` then returns ids `(B, num_tiles,
        num_indices)`; decode them with `pipe(indices=ids, height=H, width=W)` at the image's size."""
        self.autoencoder.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        """Back to whole images ([`FlowMoModel.disable_tiling`])."""
        self.autoencoder.disable_tiling()

    def _tiled_max_image_size(self, max_image_size: int | None) -> int | None:
        # With tiling the model sees one tile at a time, so the default bound (set against attention's memory on a
        # whole image) does not apply; only the output image itself is image-sized.
        if max_image_size is None and self.autoencoder.use_tiling:
            return TILED_MAX_IMAGE_SIZE_FACTOR * self.autoencoder.config.sample_size
        return max_image_size

    def preprocess(self, images: ImageInput, max_image_size: int | None = None) -> torch.Tensor:
        """Images in diffusers' formats -> float32 `(B, 3, H, W)` in [-1, 1] on the execution device, validated.

        One kind per call (PIL images, numpy arrays or torch tensors), all of one size. PIL images go through the
        package's one RGB conversion ([`~flowmo_diffusers.utils.images.to_rgb`]: EXIF orientation, transparency
        onto white, 16-bit rounded to 8 bits); uint8 arrays are divided by 255, uint16 ones rounded to 8 bits the
        same way; float arrays and tensors must lie in [0, 1] (values within one 8-bit level outside are clamped,
        anything beyond is refused, never reinterpreted as [-1, 1]). Sizes are checked against `max_image_size`
        (default [`MAX_IMAGE_SIZE_FACTOR`] x `sample_size`) before anything is converted.
        """
        if images is None:
            raise ValueError("images must not be None")
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("images is an empty list")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        kinds = {type(item).__name__ if not isinstance(item, PIL.Image.Image) else "PIL.Image" for item in items}
        if not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items):
            raise ValueError(f"images must be PIL images, numpy arrays or torch tensors, got {sorted(kinds)}")
        if len(kinds) > 1:
            raise TypeError(f"images mixes {' and '.join(sorted(kinds))}: pass a list of one kind")
        limit = self._max_image_size(max_image_size)
        sizes = [self._image_size(item) for item in items]  # shapes only: nothing is converted yet
        for height, width in sizes:
            if height < 1 or width < 1:
                raise ValueError(f"images must be at least 1x1 pixels, got {height}x{width}")
            if height > limit or width > limit:
                raise ValueError(
                    f"images of {height}x{width} exceed max_image_size={limit} ({MAX_IMAGE_SIZE_FACTOR} x the model's "
                    f"sample_size {self.autoencoder.config.sample_size} by default); pass max_image_size= to allow them"
                )
        if len(set(sizes)) > 1:
            raise ValueError(f"all images of a list must have one size, got {sorted(set(sizes))}")
        converted = [self._to_unit_float(item) for item in items]
        images = converted if isinstance(images, (list, tuple)) else converted[0]
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images[None]
        if isinstance(images, torch.Tensor) and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(f"torch images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] != 3:
            raise ValueError(f"numpy images must have shape (B, H, W, 3), got {images.shape}")
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.shape[0] == 0:
            raise ValueError(f"images holds no image (batch size 0, shape {tuple(images.shape)})")
        # Every value is in [0, 1] here, so the image processor always maps it to [-1, 1].
        pixels = self.image_processor.preprocess(images).to(device=self._execution_device, dtype=torch.float32)
        if self.autoencoder.use_tiling:
            self.autoencoder.tile_grid(*pixels.shape[-2:])  # raises for an image smaller than a tile
        else:
            self.autoencoder.check_images(pixels)
        return pixels

    def _max_image_size(self, max_image_size: int | None) -> int:
        return resolve_max_image_size(self.autoencoder.config.sample_size, max_image_size)

    @staticmethod
    def _image_size(item) -> tuple[int, int]:
        """(height, width) of one image or batch, from its shape alone."""
        if isinstance(item, PIL.Image.Image):
            return item.size[1], item.size[0]
        if isinstance(item, np.ndarray):
            if item.ndim == 3 and item.shape[-1] not in (1, 3) and item.shape[0] == 3:
                raise ValueError(f"numpy images must be channel-last (H, W, 3), got shape {item.shape}")
            if item.ndim not in (2, 3, 4):
                raise ValueError(f"numpy images must have shape (H, W, 3) or (B, H, W, 3), got {item.shape}")
            return (item.shape[-3], item.shape[-2]) if item.ndim >= 3 else item.shape
        if item.ndim not in (3, 4):
            raise ValueError(f"torch images must have shape (B, 3, H, W) or (3, H, W), got {tuple(item.shape)}")
        return item.shape[-2], item.shape[-1]

    @staticmethod
    def _to_unit_float(item):
        """One image or batch -> float in [0, 1] (numpy or torch, as given; PIL -> numpy)."""
        if isinstance(item, PIL.Image.Image):
            return np.asarray(to_rgb(item), dtype=np.float32) / 255.0
        is_numpy = isinstance(item, np.ndarray)
        if (item.dtype == np.uint8) if is_numpy else (item.dtype == torch.uint8):
            return item.astype(np.float32) / 255.0 if is_numpy else item.float() / 255.0
        if (item.dtype == np.uint16) if is_numpy else (item.dtype == torch.uint16):
            # The same 8-bit rounding as a 16-bit PIL image, so 60000 maps to one value whatever the input type.
            eight_bit = sixteen_bit_to_eight_bit(item if is_numpy else item.to(torch.int32).cpu().numpy())
            eight_bit = eight_bit.astype(np.float32) / 255.0
            return eight_bit if is_numpy else torch.from_numpy(eight_bit).to(item.device)
        if not (np.issubdtype(item.dtype, np.floating) if is_numpy else item.is_floating_point()):
            kind = "numpy" if is_numpy else "torch"
            raise ValueError(f"{kind} images must be uint8, uint16 or floating point, got dtype {item.dtype}")
        finite = np.isfinite(item).all() if is_numpy else bool(torch.isfinite(item).all())
        if not finite:
            raise ValueError("images contain NaN or infinite values")
        if item.size if is_numpy else item.numel():
            check_unit_range(float(item.min()), float(item.max()))
        return np.clip(item, 0.0, 1.0) if is_numpy else item.clamp(0.0, 1.0)

    @torch.no_grad()
    def encode(self, images: ImageInput, max_image_size: int | None = None) -> torch.LongTensor:
        """
        Tokenize images.

        Args:
            images (`ImageInput`):
                PIL, numpy or torch images in [0, 1] (see [`preprocess`]), height and width multiples of the
                patch size.
            max_image_size (`int`, *optional*, defaults to 4 x `sample_size`): the largest height or width accepted.

        Returns:
            `torch.LongTensor` of shape `(B, num_indices)`: token ids in `[0, 2**bits_per_subtoken)`, in the original
            FlowMo's order; with tiling on ([`enable_tiling`]), `(B, num_tiles, num_indices)`, tiles row-major over
            `autoencoder.tile_grid(H, W)`.
        """
        max_image_size = self._tiled_max_image_size(max_image_size)
        pixels = self.preprocess(images, max_image_size).to(self.autoencoder.dtype)
        return self.autoencoder.encode(pixels).indices

    def check_inputs(
        self,
        images,
        indices,
        num_inference_steps,
        guidance_scale,
        latents,
        height,
        width,
        output_type,
        generator=None,
        max_image_size=None,
        max_inference_steps=None,
        num_images_per_prompt=1,
    ):
        """Validate the call's arguments before any heavy work; values (NaN, range) are checked here, at the
        boundary, so the decoder's hot path never reads tensors on the host. Sizes and step counts are bounded
        (`max_image_size`, `max_inference_steps`) before anything is allocated. This is the one check of the
        scalars: `__call__` then decodes through [`FlowMoModel.decode_unchecked`].

        Raises:
            ValueError: a bad argument (a wrong type is a [`~utils.validation.WrongTypeError`], a ValueError too).
        """
        if (images is None) == (indices is None):
            raise ValueError("pass exactly one of `images` (to reconstruct) or `indices` (to decode)")
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        config = self.autoencoder.config
        check_decode_bounds(
            config.sample_size, height, width,
            config.sampling_num_inference_steps if num_inference_steps is None else num_inference_steps,
            guidance_scale, max_image_size, max_inference_steps,
        )
        if isinstance(latents, torch.Tensor) and latents.ndim == 4:
            size_limit = self._max_image_size(max_image_size)
            if max(latents.shape[-2:]) > size_limit:
                raise ValueError(
                    f"latents of {latents.shape[-2]}x{latents.shape[-1]} exceed max_image_size={size_limit} "
                    f"({MAX_IMAGE_SIZE_FACTOR} x the model's sample_size by default); pass max_image_size= to allow them"
                )
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            got = sorted({type(g).__name__ for g in generators})
            raise TypeError(
                f"generator must be a torch.Generator or a list of them (one per image), got {got}; "
                "e.g. torch.Generator().manual_seed(0)"
            )
        if isinstance(indices, torch.Tensor) and indices.ndim >= 1 and indices.shape[0] == 0:
            raise ValueError(f"indices holds no image (batch size 0, shape {tuple(indices.shape)})")
        patch = self.autoencoder.config.patch_size
        if not self.autoencoder.use_tiling and ((height is not None and height % patch) or (width is not None and width % patch)):
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
        images: ImageInput | None = None,
        indices: torch.LongTensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_image_size: int | None = None,
        max_inference_steps: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> FlowMoPipelineOutput | tuple:
        """
        Reconstruct images, or decode token ids.

        Args:
            images (`ImageInput`, *optional*):
                images to reconstruct (PIL, numpy or torch in [0, 1]). Give either `images` or `indices`.
            indices (`torch.LongTensor` of shape `(B, num_indices)`): token ids to decode, as from [`encode`]; a numpy
                array or nested list of ints works too, and one sequence `(num_indices,)` is one image.
            num_inference_steps (`int`, *optional*): solver steps; defaults to the decoder's own
                (`autoencoder.config.sampling_num_inference_steps`: 25 for the paper's sampler, K for a K-pass
                student).
            guidance_scale (`float`, *optional*): classifier-free guidance on the code, `v_null + s (v_code - v_null)`,
                applied to each model evaluation inside the guidance interval; 1 disables it. Defaults to the
                decoder's own (1.5 for the paper's sampler, 1 for a distilled student).
            num_images_per_prompt (`int`, *optional*, defaults to 1): decodings per input image or token-id
                sequence, each from its own noise; the output holds all of input 0's, then input 1's, ... (diffusers'
                order), `B * num_images_per_prompt` images. [`per_pixel_variance`] gives their per-pixel variance.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): source of the initial noise: one
                generator draws the whole batch (every sample its own noise), a list holds one generator per output
                image (`B * num_images_per_prompt`), so each sample is seeded on its own.
            latents (`torch.Tensor` of shape `(B * num_images_per_prompt, 3, H, W)`): initial noise; drawn from
                `generator` when None.
            height, width (`int`): output size when decoding `indices` (default `sample_size`); ignored for `images`.
            output_type (`str`): `"pil"`, `"np"` (`(B, H, W, 3)` in [0, 1]), `"pt"` (`(B, 3, H, W)` in [0, 1]) or
                `"latent"`: the sampler's result before postprocessing, float32 `(B, 3, H, W)` in the model's range
                [-1, 1] (FlowMo's decoder samples pixels, so its "latents" are the image; `"pt"` is `latent / 2 +
                0.5`). Intermediate states, unclamped, reach `callback_on_step_end`.
            return_dict (`bool`): return a [`FlowMoPipelineOutput`] rather than a tuple.
            max_image_size (`int`, *optional*, defaults to 4 x `sample_size`): the largest height or width accepted
                for `images`, `height`, `width` and `latents`; checked before anything is allocated.
            max_inference_steps (`int`, *optional*, defaults to 1000): the largest `num_inference_steps` accepted.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called after
                every solver step as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`, where
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs`; it returns a dict,
                and a `"latents"` tensor in it replaces the current latents (the sample at the next flow time).
                diffusers' conventions hold: setting `pipe._guidance_scale` changes the guidance from the next step on
                (1.0 turns it off, one decoder pass per step), setting `pipe._interrupt = True` stops sampling after
                this step (the output is then the current latents, clamped), and `pipe.num_timesteps` is the number
                of solver steps.
            callback_on_step_end_tensor_inputs (`List[str]`, *optional*, defaults to `["latents"]`): the tensors
                passed to the callback, from `_callback_tensor_inputs`.

        Returns:
            [`FlowMoPipelineOutput`] with `images` and `num_decoder_passes` (decoder evaluations per image).
        """
        max_image_size = self._tiled_max_image_size(max_image_size)
        if indices is not None:
            # Lists and arrays become a tensor here, so that every later check reads one kind of value.
            indices = as_integer_tensor("indices", indices)
            if indices.ndim == 1 and indices.numel() and not self.autoencoder.use_tiling:
                indices = indices[None]  # one sequence is one image, as one prompt or one PIL image is in diffusers
        callback_on_step_end_tensor_inputs = pipeline_utils.check_callback(
            self, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self.check_inputs(
            images, indices, num_inference_steps, guidance_scale, latents, height, width, output_type, generator,
            max_image_size, max_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
        )
        model = self.autoencoder
        device = self._execution_device
        dtype = model.dtype

        if images is not None:
            pixels = self.preprocess(images, max_image_size)
            height, width = pixels.shape[-2:]
            code = model.encode(pixels.to(dtype)).code
        else:
            code = model.indices_to_code(indices.to(device), dtype=dtype)
        # Each input is encoded once; its code is repeated for its num_images_per_prompt decodings.
        code = code.repeat_interleave(num_images_per_prompt, dim=0)
        batch_size = code.shape[0]
        if latents is not None and latents.shape[0] != batch_size:
            raise ValueError(f"latents must be a tensor of shape ({batch_size}, 3, H, W), got {tuple(latents.shape)}")
        if images is None:
            height = height or model.config.sample_size
            width = width or model.config.sample_size
        if latents is not None and tuple(latents.shape[-2:]) != (height, width):
            raise ValueError(f"latents must be a tensor of shape ({batch_size}, 3, {height}, {width}), got {tuple(latents.shape)}")
        pipeline_utils.check_generators(generator, batch_size, "inputs x num_images_per_prompt")
        step_callback = pipeline_utils.prepare_step_callback(
            self, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self._guidance_scale = float(model.config.sampling_guidance_scale if guidance_scale is None else guidance_scale)
        self._num_timesteps = 0
        self._interrupt = False

        decoded = model.decode_unchecked(
            code,
            num_inference_steps=None if num_inference_steps is None else int(num_inference_steps),
            # Read before every step, so that a callback's `pipe._guidance_scale = ...` applies from the next one.
            guidance_scale=lambda step_index: self._guidance_scale,
            generator=generator,
            latents=latents,
            height=height,
            width=width,
            scheduler=self.scheduler,
            step_callback=step_callback,
            progress_bar=self._progress_over_timesteps,
            interrupt=lambda: self._interrupt,
        )
        images = decoded.sample
        if output_type == "pt":
            images = images / 2 + 0.5
        elif output_type != "latent":
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FlowMoPipelineOutput(images=images, num_decoder_passes=decoded.num_decoder_passes)
