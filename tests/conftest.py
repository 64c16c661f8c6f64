import os

import pytest
import torch

from hub_stub import local_hub  # noqa: F401  (the local Hub stand-in with the client patched, as a fixture)

# Tests never reach the network: pretrained weights are passed explicitly and Hub tests use a local stand-in.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_model():
    from testing_utils import tiny_flowmo_model

    return tiny_flowmo_model()


@pytest.fixture
def tiny_pipeline(tiny_model):
    from testing_utils import tiny_flowmo_pipeline

    return tiny_flowmo_pipeline(tiny_model)


@pytest.fixture
def tiny_transformer():
    from testing_utils import tiny_maskgit_transformer

    return tiny_maskgit_transformer()


@pytest.fixture
def maskgit_pipeline(tiny_transformer, tiny_model):
    from testing_utils import tiny_maskgit_pipeline

    return tiny_maskgit_pipeline(tiny_transformer, tiny_model)
