#!/usr/bin/env python3
"""What it costs to read the GradInit scales back from a checkpoint (docs/checkpoint-state.md).

    python bench/checkpoint_state_read.py [--params 36000000] [--out bench/results/checkpoint-state-read.md]

Saves a checkpoint-shaped state dict (model, Adam state, task_state) of --params
parameters, then times ``state.checkpoint_scales`` (torch.load with mmap: tensors mapped,
not read) against the full ``torch.load`` fairseq does anyway, side by side.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fairseq_gradinit.state import checkpoint_scales  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=36_000_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "checkpoint-state-read.md"))
    args = parser.parse_args(argv)
    chunks, size = 100, args.params // 100
    state = {
        "model": {f"w{i}": torch.randn(size) for i in range(chunks)},
        "last_optimizer_state": {"state": {i: {"exp_avg": torch.zeros(size), "exp_avg_sq": torch.zeros(size)} for i in range(chunks)}},
        "task_state": {"gradinit": {"scales": {f"w{i}": 1.0 for i in range(chunks)}}},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(state, path)
        del state
        megabytes = os.path.getsize(path) / 1e6
        start = time.perf_counter()
        assert len(checkpoint_scales(path)["scales"]) == chunks
        mapped = time.perf_counter() - start
        start = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=False)
        full = time.perf_counter() - start
    table = (
        f"Checkpoint of {args.params:,} parameters plus Adam state, {megabytes:.0f} MB "
        f"(`python bench/checkpoint_state_read.py --params {args.params}`)\n\n"
        "| read | seconds | ratio |\n|---|---|---|\n"
        f"| task state only (`state.checkpoint_scales`, mmap) | {mapped:.3f} | {mapped / full:.3f} |\n"
        f"| full `torch.load` (fairseq's own load) | {full:.3f} | 1 |\n"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
