#!/usr/bin/env python
"""The per-step reduce of the training loops: what the preemption flag costs.

Every optimizer step reduces the loss terms, the non-finite flag and the preemption flag across processes and reads
them on the host (the step's one sync). This script times that reduce and counts its collectives, interleaved round
by round, for: the package's stacked reduce (`training.distributed.mean_across_processes`) with the flag and without
it, and `accelerator.reduce` of the same dict (one all-reduce per entry, what the loops did before).

    accelerate launch --multi_gpu --num_processes 2 benchmarks/benchmark_step_reduce.py   # with ACCELERATE_USE_CPU=1
    python benchmarks/benchmark_step_reduce.py --terms 9 --rounds 5 --calls 200           # one process: no collective
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_utils import RESULTS_DIR, environment, markdown_table, record  # noqa: E402

from flowmo_diffusers.training.distributed import mean_across_processes  # noqa: E402
from flowmo_diffusers.utils.validation import positive_int  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=positive_int, default=8,
                        help="loss terms and flags in the step's dict without the preemption flag (stage 1A logs 8)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--calls", type=positive_int, default=200, help="reduces per contender and round")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "benchmark_step_reduce.jsonl"))
    return parser.parse_args(argv)


class CollectiveCounter:
    """Counts `torch.distributed.all_reduce` calls (Accelerate's reduce calls it through the module attribute)."""

    def __init__(self):
        self.calls = 0
        self._original = dist.all_reduce

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc_info):
        dist.all_reduce = self._original


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(cpu=True)
    device = accelerator.device
    terms = {f"term_{i}": torch.rand((), device=device) for i in range(args.terms)}
    with_flag = dict(terms, preempted=torch.zeros((), device=device))

    def per_entry(scalars):  # the loops before: one collective per entry, one .item() each
        return {k: v.item() for k, v in accelerator.reduce(scalars, reduction="mean").items()}

    contenders = {
        "stacked, with the preemption flag": lambda: mean_across_processes(accelerator, with_flag),
        "stacked, without the flag": lambda: mean_across_processes(accelerator, terms),
        "accelerator.reduce per entry, with the flag": lambda: per_entry(with_flag),
        "accelerator.reduce per entry, without the flag": lambda: per_entry(terms),
    }
    assert per_entry(with_flag) == mean_across_processes(accelerator, with_flag)  # same figures either way
    times = {name: [] for name in contenders}
    collectives = {}
    for name, run in contenders.items():
        with CollectiveCounter() as counter:
            run()
        collectives[name] = counter.calls
    for round_index in range(args.rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for name in order:
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            for _ in range(args.calls):
                contenders[name]()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    if not accelerator.is_main_process:
        return
    env = environment("cpu")
    rows, records = [], []
    for name in contenders:
        median = statistics.median(times[name])
        rows.append([name, len(with_flag) if "with the" in name else len(terms), collectives[name], f"{median:.1f}",
                     f"{min(times[name]):.1f}-{max(times[name]):.1f}"])
        records.append({"benchmark": "step_reduce", "contender": name, "processes": accelerator.num_processes,
                        "collectives": collectives[name], "median_us": median, "runs_us": times[name],
                        "calls": args.calls, "environment": env})
    print(f"{accelerator.num_processes} process(es), {accelerator.state.distributed_type}, "
          f"load {env.get('loadavg_1_5_15')}")
    print(markdown_table(["reduce", "entries", "all-reduces", "median us", "range us"], rows))
    record(records, args.output)


if __name__ == "__main__":
    main()
