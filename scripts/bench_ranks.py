#!/usr/bin/env python
"""Meta-training speed of one process with N threads against N ranks (torchrun, gloo) with one thread each.

Usage:
    python scripts/bench_ranks.py --data-root DIR [--ranks 2] [--repeats 2] [--settings a,b] [--keep DIR]

Runs ``maml-train`` itself on Omniglot with MAML's presets (setting a: ``maml_omniglot_5w1s``, 5-way 1-shot,
meta-batch 32, 1 inner step; setting b: ``maml_omniglot_20w1s``, 20-way 1-shot, meta-batch 16, 5 inner steps; one
query per class, as they train, where ``scripts/bench.py``'s a and b score 15 and 5), alternating the two ways of running (interleaved, so that a change in the machine's load hits both alike),
and reports the trainer's own tasks per second (the median of its ``train/tasks_per_second``, leaving out
the first window, which includes start-up). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from maml_cli.results import find_runs, read_events

SETTINGS = {
    "a": ["experiment=maml_omniglot_5w1s", "iterations=60"],
    "b": ["experiment=maml_omniglot_20w1s", "iterations=20"],
}


def run(mode: str, setting: str, ranks: int, data_root: str, folder: Path) -> float:
    """One short training run; its median tasks per second after the first logged window."""
    common = [*SETTINGS[setting], f"data_root={data_root}", "log_every=5", "val_every=1000000", "val_tasks=1", "test_tasks=1",
              "progress=false", "device=cpu", f"hydra.run.dir={folder}"]
    train = str(Path(sys.executable).parent / "maml-train")
    if mode == "process":
        command = [train, *common, f"threads={ranks}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(ranks)}
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", train, *common, "threads=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rates = [p.value for p in read_events(find_runs([folder])[0]).scalars["train/tasks_per_second"]]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="a,b")
    parser.add_argument("--keep", type=Path, help="keep the runs under this folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_ranks_"))
    print(f"| setting | 1 process, {args.ranks} threads (tasks/s) | {args.ranks} ranks, 1 thread each (tasks/s) | ranks / process |")
    print("|---|---|---|---:|")
    for setting in args.settings.split(","):
        measured: dict[str, list[float]] = {"process": [], "ranks": []}
        for repeat in range(args.repeats):
            for mode in ("process", "ranks"):
                measured[mode].append(run(mode, setting, args.ranks, args.data_root, root / f"{setting}_{mode}_{repeat}"))
        one, many = statistics.median(measured["process"]), statistics.median(measured["ranks"])
        print(f"| {setting} | {' / '.join(f'{v:.2f}' for v in measured['process'])} | {' / '.join(f'{v:.2f}' for v in measured['ranks'])} "
              f"| {many / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
