"""What a training run shows and publishes: the validation figure and the Hub model card."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch


def validation_grid(rows: list[torch.Tensor], padding: int = 2, value_range: tuple[float, float] = (-1.0, 1.0)):
    """PIL image with one row per batch of `(B, 3, H, W)` images (originals, reconstructions, ...).

    Args:
        rows (`list[torch.Tensor]`): [B, 3, H, W] batches, one per row of the figure.
        padding (`int`, *optional*, defaults to 2): pixels between the images.
        value_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`): the range of `rows`: the package's
            inside range, or `(0.0, 1.0)` for a pipeline's output, drawn as it is rather than mapped to [-1, 1] and
            back.
    """
    import PIL.Image
    from torchvision.utils import make_grid

    if not rows:
        raise ValueError("no rows to draw")
    if tuple(value_range) == (-1.0, 1.0):
        images = torch.cat([row.detach().float().cpu().clamp(-1, 1) for row in rows]) / 2 + 0.5
    elif tuple(value_range) == (0.0, 1.0):
        images = torch.cat([row.detach().float().cpu().clamp(0, 1) for row in rows])
    else:
        raise ValueError(f"value_range must be (-1.0, 1.0) or (0.0, 1.0), got {value_range!r}")
    grid = make_grid(images, nrow=rows[0].shape[0], padding=padding, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return PIL.Image.fromarray(array)


def write_model_card(
    output_dir: str,
    *,
    repo_id: str,
    stage: str,
    command: str,
    model_config: dict,
    training_args: dict,
    base_model: str | None = None,
    final_metrics: dict | None = None,
    global_step: int | None = None,
    images: Iterable[str] = (),
    ema: bool = False,
    summary: str | None = None,
    usage: str | None = None,
    metrics_caption: str = "PSNR (dB) on the fixed validation batch of the training script (top row: inputs).",
    tags: Iterable[str] = ("flowmo", "image-tokenizer"),
    pipeline_tag: str = "image-to-image",
) -> str:
    """Write `output_dir/README.md`: a Hub model card for a trained pipeline; returns its path.

    Records the stage, the exact command, the model config, the training arguments, the final validation metrics
    and the validation figures (paths relative to `output_dir`). `summary` and `usage` (Python code) replace the
    FlowMo tokenizer's defaults for other pipelines (the MaskGiT prior).
    """
    import json

    # huggingface_hub's ModelCard writes and validates the card; diffusers' load_or_create_model_card is not used because
    # it first looks the card up on the Hub and fills its own training template, which has no stage, command or config.
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="diffusers",
        license="mit",
        tags=[*tags, "diffusers", "diffusers-training"],
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        pipeline_tag=pipeline_tag,
    )
    stage_name = {"pretrain": "stage 1A pre-training (mode matching)", "posttrain": "stage 1B post-training (mode seeking)"}
    if summary is None and stage == "distill":
        passes = model_config.get("sampling_num_inference_steps")
        summary = (
            f"A {passes}-pass student of `{base_model}`: a [FlowMo](https://arxiv.org/abs/2503.11056) decoder distilled "
            f"with `flowmo-diffusers` ({global_step} optimizer steps) to reproduce in {passes} decoder passes, without a "
            "guidance pass, what the teacher decodes with its own sampler (the paper's: 25 steps, guidance 1.5, 31 "
            "passes) from the same token ids and noise. Its encoder is the teacher's, unchanged: it reads and writes "
            "the teacher's token ids, and `pipe(indices=ids)` decodes in "
            f"{passes} passes by default."
        )
    if summary is None:
        summary = (
            f"A [FlowMo](https://arxiv.org/abs/2503.11056) image tokenizer trained with `flowmo-diffusers` "
            f"({stage_name.get(stage, stage)}), {global_step} optimizer steps"
            + (f", starting from `{base_model}`" if base_model else "")
            + "."
        )
    if usage is None:
        usage = "\n".join([
            "from flowmo_diffusers import FlowMoPipeline",
            "",
            f'pipe = FlowMoPipeline.from_pretrained("{repo_id}")',
            "ids = pipe.encode(images)                 # token ids",
            "recon = pipe(indices=ids).images          # decoded images",
        ])
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"{summary} The weights are the {'EMA' if ema else 'final (non-EMA)'} weights.",
        "",
        "```python",
        usage,
        "```",
        "",
        "## Validation",
        "",
    ]
    if final_metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.3f} |" for name, value in final_metrics.items()]
        lines += ["", metrics_caption]
    for image in images:
        lines += ["", f"![reconstructions]({image})"]
    lines += [
        "",
        "## Training command",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Model config",
        "",
        "```json",
        json.dumps(model_config, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Training arguments",
        "",
        "```json",
        json.dumps(training_args, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    card = ModelCard("\n".join(lines))
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


__all__ = ["validation_grid", "write_model_card"]
