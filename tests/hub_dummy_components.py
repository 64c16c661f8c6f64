"""Throwaway pipeline components that live *outside* ``diffusers`` (used by ``tests/utils/test_hub.py``).

They stand in for ``flowmo_diffusers.FlowMoModel`` / ``FlowMoScheduler`` until those exist. Everything is
exported at module top level: diffusers records a component living in a non-diffusers library as
``[<module.__name__>, <ClassName>]`` in ``model_index.json`` (here ``["hub_dummy_components", "TinyHubModel"]``)
and re-imports it with ``importlib.import_module(<module.__name__>)`` when loading.

No ``from __future__ import annotations`` here: diffusers before 0.37 reads ``__init__`` annotations as objects
(``inspect.signature``), so string annotations make ``from_pretrained`` fail with a KeyError at the floor (0.36).
"""

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from flowmo_diffusers.utils.hub import HubPipelineMixin


class TinyHubModel(ModelMixin, ConfigMixin):
    """A 2-layer MLP, small enough that a saved pipeline is a few KiB."""

    @register_to_config
    def __init__(self, dim: int = 4, hidden: int = 8):
        super().__init__()
        self.encoder = torch.nn.Linear(dim, hidden)
        self.decoder = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


class TinyHubScheduler(SchedulerMixin, ConfigMixin):
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 10, shift: float = 1.0):
        self.timesteps = torch.linspace(1.0, 0.0, num_train_timesteps)


class TinyHubPipeline(DiffusionPipeline):
    """Plain ``DiffusionPipeline`` subclass: ``from_pretrained("<user>/<repo>")`` fails in diffusers 0.42.1."""

    model_cpu_offload_seq = "autoencoder"

    def __init__(self, autoencoder: TinyHubModel, scheduler: TinyHubScheduler):
        super().__init__()
        self.register_modules(autoencoder=autoencoder, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x)


class TinyHubMixinPipeline(HubPipelineMixin, TinyHubPipeline):
    """Same pipeline with the fix: ``HubPipelineMixin`` must come *before* ``DiffusionPipeline`` in the bases."""


def make_tiny_pipeline(cls: type = TinyHubPipeline, seed: int = 0):
    """A deterministic pipeline instance of ``cls`` (``TinyHubPipeline`` or ``TinyHubMixinPipeline``)."""
    torch.manual_seed(seed)
    return cls(autoencoder=TinyHubModel(), scheduler=TinyHubScheduler())
