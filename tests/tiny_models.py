"""The tiny FlowMo tokenizer the tests share (flowmo-tiny with every weight perturbed)."""

import torch

from flowmo_diffusers import FlowMoModel, get_preset_config


def tiny_flowmo_model(seed: int = 0, **config_overrides) -> FlowMoModel:
    """flowmo-tiny (32x32 images, 24 ids of 4 bits) in eval mode. Gates start at zero in training; every weight gets
    a 0.05-scale perturbation so that tests see the whole network."""
    torch.manual_seed(seed)
    model = FlowMoModel(**{**get_preset_config("flowmo-tiny"), **config_overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()
