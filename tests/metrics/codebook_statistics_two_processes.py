"""Run by test_codebook_statistics.py under `accelerate launch --num_processes 2`: each process counts its own
share of a fixed id tensor; the combined statistics are written by process 0 as JSON."""

import json
import sys

import torch
from accelerate import Accelerator

from flowmo_diffusers.metrics import CodebookStatistics

accelerator = Accelerator(cpu=True)
ids_path, output_path = sys.argv[1], sys.argv[2]
ids = torch.load(ids_path, weights_only=True)
results = {}
for name, bits, dense in (("dense", 5, True), ("sparse", 5, False)):
    statistics = CodebookStatistics(bits, dense=dense)
    # Uneven shares: process 0 takes rows 0..2, process 1 the rest.
    share = ids[:3] if accelerator.process_index == 0 else ids[3:]
    statistics.update(share)
    results[name] = statistics.compute(accelerator)
if accelerator.is_main_process:
    with open(output_path, "w") as handle:
        json.dump(results, handle)
accelerator.wait_for_everyone()
