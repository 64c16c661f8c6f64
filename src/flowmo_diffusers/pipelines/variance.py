"""Per-pixel variance over several decodings of one input: FlowMo's "multimodal reconstruction" picture.

FlowMo's decoder is a diffusion model, so one token sequence decodes to many images; the paper (Sargent et al.,
2025, Figure 8) shows where they differ as the per-pixel variance over samples. Draw them with the pipelines'
`num_images_per_prompt` and pass the output here.
"""


import numpy as np
import PIL.Image
import torch

from ..utils.validation import check_int

__all__ = ["per_pixel_variance"]


def per_pixel_variance(
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor, num_images_per_prompt: int
) -> np.ndarray | torch.Tensor:
    r"""
    Variance over each input's `num_images_per_prompt` decodings, per pixel, averaged over the color channels.

    Args:
        images (`List[PIL.Image.Image]`, `np.ndarray` of shape `(B * n, H, W, 3)` or `torch.Tensor` of shape
            `(B * n, 3, H, W)`):
            A pipeline's output `images` (any `output_type` but `"latent"`), ordered as the pipelines order them: all
            `n` samples of input 0, then input 1, ...
        num_images_per_prompt (`int`):
            `n`, the value the pipeline was called with (at least 2).

    Returns:
        `np.ndarray` (for PIL or numpy input) or `torch.Tensor` of shape `(B, H, W)`, float32: the population
        variance (divided by `n`) of the pixel values in [0, 1] over the `n` samples, mean over channels.
    """
    num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, 2)
    as_tensor = isinstance(images, torch.Tensor)
    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(image, PIL.Image.Image) for image in images):
            raise ValueError("images must be a pipeline's output: a list of PIL images, a numpy array or a tensor")
        images = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"numpy images must have shape (B * n, H, W, C), got {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif not as_tensor:
        raise ValueError(f"images must be PIL images, a numpy array or a tensor, got {type(images).__name__}")
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be floating-point (B * n, C, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}")
    total = images.shape[0]
    if total % num_images_per_prompt:
        raise ValueError(f"{total} images are not a whole number of groups of num_images_per_prompt={num_images_per_prompt}")
    groups = images.float().reshape(total // num_images_per_prompt, num_images_per_prompt, *images.shape[1:])
    variance = groups.var(dim=1, unbiased=False).mean(dim=1)
    return variance if as_tensor else variance.numpy()
