"""Pipeline folders saved before the restructure of issue 12 (tests/fixtures/saved_pipelines, written at bae8104)
still load, and decode what they decoded then: `model_index.json` names the classes by their module paths."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import FIXTURES

from flowmo_diffusers import FlowMoMaskGiTPipeline, FlowMoPipeline

SAVED = FIXTURES / "saved_pipelines"


@pytest.fixture(scope="module")
def expected():
    return load_file(SAVED / "expected_outputs.safetensors")


def test_the_module_paths_the_fixtures_name_still_hold_their_classes():
    for folder in ("flowmo_tiny", "flowmo_maskgit_tiny"):
        index = json.loads((SAVED / folder / "model_index.json").read_text())
        components = [entry for key, entry in index.items() if not key.startswith("_")]
        assert len(components) >= 2
        for module, class_name in components:
            assert module.startswith(("flowmo_diffusers.models.", "flowmo_diffusers.schedulers."))
            assert hasattr(importlib.import_module(module), class_name), f"{module}.{class_name}"


def test_a_saved_flowmo_pipeline_loads_and_decodes_as_before(expected):
    pipe = FlowMoPipeline.from_pretrained(SAVED / "flowmo_tiny")
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(pipe.encode(expected["images"]), expected["indices"])
    images = pipe(
        indices=expected["indices"], num_inference_steps=4, generator=torch.Generator().manual_seed(2), output_type="pt"
    ).images
    torch.testing.assert_close(images, expected["reconstructions"], rtol=0, atol=1e-6)


def test_a_saved_maskgit_pipeline_loads_and_generates_as_before(expected):
    pipe = FlowMoMaskGiTPipeline.from_pretrained(SAVED / "flowmo_maskgit_tiny")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [1, 7], num_inference_steps=4, decoder_num_inference_steps=2, generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    torch.testing.assert_close(images, expected["generated"], rtol=0, atol=1e-6)
