"""Test-only launcher: run a training script under Accelerate's FSDP2 on CPU processes.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_on_cpu.py examples/train_flowmo/train.py ARGS...
    (with ACCELERATE_USE_CPU=true)

Accelerate builds FSDP only on accelerators: with CPU processes it sets up gloo DDP and ignores the FSDP config. torch's
FSDP2 (`fully_shard`) itself runs on CPU with gloo, so this launcher switches the Accelerator state to FSDP2 (version
2, transformer-block auto-wrap of `FlowMoBlock`, full state dicts) right after the script creates its Accelerator,
and Accelerate's FSDP2 code path (`fsdp2_prepare_model`, `get_state_dict`, `save_state`) then runs for real on
sharded DTensor parameters. Users never need this: on GPUs, `accelerate launch --use_fsdp --fsdp_version 2` does
the same through the config.
"""

import runpy
import sys

import accelerate
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_create_accelerator = accelerate.Accelerator.__init__


def _create_fsdp_accelerator(self, *args, **kwargs):
    _create_accelerator(self, *args, **kwargs)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["FlowMoBlock"],
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
    )


accelerate.Accelerator.__init__ = _create_fsdp_accelerator

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
