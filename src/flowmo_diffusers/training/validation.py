"""What a FlowMo training run checks as it goes: a fixed batch reconstructed by the live (and EMA) weights with the
decoder's own sampler, its PSNR, a grid image and the trackers' records."""

from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np
import torch

from ..metrics.psnr import psnr_per_image
from ..models.autoencoder_flowmo import FlowMoModel
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from .reporting import validation_grid

logger = logging.getLogger(__name__)


class ReconstructionValidation:
    """Reconstruct one fixed batch during training; log its PSNR, save a grid, feed the trackers.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator (device, autocast, trackers, processes).
        training_module (`torch.nn.Module`): the prepared module that holds the autoencoder as `.autoencoder`
            (its state dict is gathered when the parameters are FSDP2 shards).
        model (`FlowMoModel`): the autoencoder being trained (unwrapped).
        scheduler (`FlowMoScheduler`): its config gives the sampler's time grid and guidance interval.
        images (`torch.Tensor` of shape `(B, 3, H, W)` in [-1, 1], *optional*): the fixed batch; None on the processes
            that do not reconstruct (all but the main one, unless `sharded`).
        output_dir (`str`): where `validation/step-N.png`, `reconstructions.png` and `validation_metrics.jsonl` go.
        ema (`diffusers.training_utils.EMAModel`, *optional*): when given, every validation also reconstructs with
            the EMA weights (`psnr_ema`).
        seed (`int`): seed of the sampler's noise, the same at every validation so that rows compare.
        num_inference_steps (`int`, *optional*), guidance_scale (`float`, *optional*): the sampler's settings
            (default: the decoder's own).
        sharded (`bool`): the parameters are FSDP2 shards; every process takes part in gathering them, and the main
            process reconstructs with the gathered copy.
    """

    def __init__(self, accelerator, training_module, model: FlowMoModel, scheduler: FlowMoScheduler,
                 images: torch.Tensor | None, output_dir: str, *, ema=None, seed: int = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, sharded: bool = False):
        self.accelerator = accelerator
        self.training_module = training_module
        self.model = model
        self.scheduler_config = scheduler.config
        self.images = images
        self.output_dir = output_dir
        self.ema = ema
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.sharded = sharded

    @property
    def takes_part(self) -> bool:
        """Whether this process joins [`run`] (the main process; every process when sharded)."""
        return self.accelerator.is_main_process or self.sharded

    def gather_autoencoder(self) -> FlowMoModel | None:
        """An unsharded copy of the FSDP2-sharded autoencoder on the main process (None elsewhere); a collective."""
        state = self.accelerator.get_state_dict(self.training_module)
        if not self.accelerator.is_main_process:
            return None
        prefix = "autoencoder."
        with torch.random.fork_rng(devices=[]):  # building draws random init weights: keep the training stream intact
            copy = FlowMoModel.from_config(self.model.config)
        copy.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
        return copy.to(self.accelerator.device).eval()

    def final_autoencoder(self) -> FlowMoModel | None:
        """The autoencoder to save: the model itself, or its gathered copy when sharded (call on every process)."""
        return self.gather_autoencoder() if self.sharded else self.model

    @contextlib.contextmanager
    def ema_weights(self):
        """The model holds the EMA weights inside the block (call on every process when sharded)."""
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.model.parameters())

    def reconstruct(self, autoencoder: FlowMoModel) -> torch.Tensor:
        """The fixed batch through `autoencoder` with its sampler: `(B, 3, H, W)` float32 in [-1, 1].

        Uses the model's [-1, 1] API (`encode`, `decode`) directly: the batch is already a model input, so the
        pipeline's conversion from user images would only convert it twice."""
        was_training = autoencoder.training
        autoencoder.eval()
        generator = torch.Generator(self.accelerator.device).manual_seed(self.seed)
        with torch.no_grad(), self.accelerator.autocast():
            code = autoencoder.encode(self.images.to(device=autoencoder.device, dtype=autoencoder.dtype)).code
            sample = autoencoder.decode(
                code, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                generator=generator, scheduler=FlowMoScheduler.from_config(self.scheduler_config),
            ).sample
        autoencoder.train(was_training)
        return sample.float()

    def run(self, step: int) -> dict | None:
        """Reconstruct with the live (and EMA) weights; record PSNR and the grid. Call where [`takes_part`]; returns
        the metrics on the main process, None elsewhere."""
        rows = [self.images]

        def add_row():
            autoencoder = self.final_autoencoder()
            if self.accelerator.is_main_process:
                rows.append(self.reconstruct(autoencoder))

        add_row()
        if self.ema is not None:
            with self.ema_weights():
                add_row()
        if self.accelerator.is_main_process:
            return self.record(step, rows, ["psnr", "psnr_ema"][: len(rows) - 1])
        return None

    def record(self, step: int, rows: list[torch.Tensor], metric_names: list[str], final: bool = False,
               extra: dict | None = None) -> dict:
        """Main process: PSNR of each reconstruction row against the first row, the grid (`reconstructions.png` when
        `final`, else `validation/step-N.png`), a line of `validation_metrics.jsonl` and the trackers; returns the
        PSNR figures by name."""
        metrics = {name: float(np.mean(psnr_per_image(self.images, row))) for name, row in zip(metric_names, rows[1:])}
        grid = validation_grid(rows)
        name = "reconstructions.png" if final else os.path.join("validation", f"step-{step:08d}.png")
        os.makedirs(os.path.dirname(os.path.join(self.output_dir, name)), exist_ok=True)
        grid.save(os.path.join(self.output_dir, name))
        record = {"step": step, "final": final, **metrics, **(extra or {})}
        with open(os.path.join(self.output_dir, "validation_metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(f"validation {record}")
        self.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation/reconstructions", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation/reconstructions": wandb.Image(grid)}, step=step)
        return metrics


__all__ = ["ReconstructionValidation"]
