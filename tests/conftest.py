import os
from pathlib import Path

import pytest
import torch

# Tests never reach the network: pretrained weights are passed explicitly and Hub tests use a local stand-in.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = Path(__file__).parent / "fixtures"
ORIGINAL_TINY = FIXTURES / "original_tiny"


@pytest.fixture
def tiny_model():
    from tiny_models import tiny_flowmo_model

    return tiny_flowmo_model()


@pytest.fixture
def tiny_pipeline(tiny_model):
    from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler

    pipeline = FlowMoPipeline(autoencoder=tiny_model, scheduler=FlowMoScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
