"""What the tests share: repository paths, the tiny models and pipelines, the pickle payload of the hostile-file tests
and `accelerate launch` of the example scripts. Each test folder mirrors a subpackage of `flowmo_diffusers`."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from flowmo_diffusers import (
    FlowMoMaskGiTPipeline,
    FlowMoMaskGiTTransformer,
    FlowMoModel,
    FlowMoPipeline,
    FlowMoScheduler,
    MaskGiTScheduler,
    get_maskgit_preset_config,
    get_preset_config,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Outputs of the original FlowMo code on its tiny configuration (golden values and a converted checkpoint).
ORIGINAL_TINY = FIXTURES / "original_tiny"
ORIGINAL_CHECKPOINT = ORIGINAL_TINY / "flowmo_tiny_original.pth"
CONVERSION_SCRIPT = REPO / "scripts" / "convert_flowmo_original_to_diffusers.py"


def tiny_flowmo_model(seed: int = 0, perturb: bool = True, **config_overrides) -> FlowMoModel:
    """flowmo-tiny (32x32 images, 24 ids of 4 bits) in eval mode.

    Gates start at zero in training; with `perturb` every weight gets a 0.05-scale perturbation so that tests see the
    whole network. `perturb=False` gives the model as training starts it (and in train mode).
    """
    torch.manual_seed(seed)
    model = FlowMoModel(**{**get_preset_config("flowmo-tiny"), **config_overrides})
    if not perturb:
        return model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def tiny_flowmo_pipeline(model: FlowMoModel = None) -> FlowMoPipeline:
    """A `FlowMoPipeline` around `model` (default: `tiny_flowmo_model()`), progress bar off."""
    pipeline = FlowMoPipeline(autoencoder=model if model is not None else tiny_flowmo_model(), scheduler=FlowMoScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tiny_maskgit_transformer(seed: int = 0, **config_overrides) -> FlowMoMaskGiTTransformer:
    """maskgit-tiny (the prior over flowmo-tiny's 24 ids of 16 values, 10 classes) in eval mode."""
    torch.manual_seed(seed)
    return FlowMoMaskGiTTransformer(**{**get_maskgit_preset_config("maskgit-tiny"), **config_overrides}).eval()


def tiny_maskgit_pipeline(transformer: FlowMoMaskGiTTransformer, autoencoder: FlowMoModel) -> FlowMoMaskGiTPipeline:
    """A `FlowMoMaskGiTPipeline` (mask id = the codebook size, as the prior expects), progress bar off."""
    pipeline = FlowMoMaskGiTPipeline(
        transformer=transformer,
        scheduler=MaskGiTScheduler(mask_token_id=transformer.config.codebook_size),
        autoencoder=autoencoder,
        decoder_scheduler=FlowMoScheduler(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


#: maskgit-tiny over flowmo-tiny: (ids per image, values per id, classes, mask id, null class).
MASKGIT_TINY_SIZES = (24, 16, 10, 16, 10)
MASKGIT_TINY_NUM_IDS, MASKGIT_TINY_CODEBOOK_SIZE = MASKGIT_TINY_SIZES[:2]


def random_token_ids(batch, generator_seed=0, with_masks=False):
    """`(batch, 24)` random maskgit-tiny token ids; with `with_masks` the mask id 16 is drawn too."""
    values = MASKGIT_TINY_CODEBOOK_SIZE + int(with_masks)
    generator = torch.Generator().manual_seed(generator_seed)
    return torch.randint(0, values, (batch, MASKGIT_TINY_NUM_IDS), generator=generator)


def load_conversion_script():
    """`scripts/convert_flowmo_original_to_diffusers.py` as a module (its `main` runs in this process)."""
    spec = importlib.util.spec_from_file_location("convert_flowmo_original_to_diffusers", CONVERSION_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WritesAMarker:
    """A pickle payload: unpickling it opens (creates) a marker file, as a hostile checkpoint would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def free_port() -> int:
    """A free TCP port on the loopback interface for the processes' rendezvous. Port 0 ("any free port") is not
    used: with torch 2.5 (the floor) the workers are not told the port the launcher picks and wait forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_process_tree(process):
    """SIGKILL a launched process and every process under it, and wait for them all.

    `os.killpg` of the launcher's group is not enough: torchrun (`accelerate launch --multi_gpu`) starts each worker in
    a session of its own, so the workers would survive the kill and go on writing. The launcher goes first (no
    restarts), then the tree listed before it died. psutil comes with accelerate."""
    import psutil

    tree = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    process.wait()


def launch(script, arguments, num_processes=1, env=None, timeout=300):
    """`accelerate launch SCRIPT ARGUMENTS` with `num_processes` CPU processes; returns stdout + stderr, raises on failure."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    env = dict(os.environ if env is None else env)
    # One thread per process: on a small shared CPU, OpenMP thread pools of 2+ threads can stall for seconds per step.
    env.setdefault("OMP_NUM_THREADS", "1")
    if num_processes > 1:
        # Several CPU processes: the multi-GPU launcher (torchrun) plus ACCELERATE_USE_CPU selects gloo DDP.
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command + [str(script)] + [str(a) for a in arguments], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result.stdout + result.stderr
