#!/usr/bin/env python
"""Meta-training with glibc's malloc as it comes against ``keep_freed_memory=true`` (the default).

Usage:
    python scripts/bench_allocator.py --data-root DIR --split-dir DIR [--repeats 2] [--settings protonet,maml,lstm] [--threads 1]

Runs ``maml-train`` on Omniglot (Vinyals split) at each setting's preset for a few iterations, once with
``keep_freed_memory=false`` and once with ``true``, alternating (interleaved, so that a change in the machine's load
hits both alike), and reports per process: the trainer's tasks per second (median of its logged
``train/tasks_per_second`` after the first window, which includes start-up), user and system CPU seconds,
peak resident memory and minor page faults (the kernel's, from ``wait4``), printed as each pair is measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from maml_cli.results import find_runs, read_events
from measured_process import run_measured

SETTINGS = {
    "protonet": ["experiment=protonet_omniglot_5w1s", "iterations=30"],  # 60-way episodes with 5 queries, one per update
    "maml": ["experiment=maml_omniglot_5w1s", "iterations=40"],  # 5-way 1-shot, meta-batch 32
    "lstm": ["experiment=lstm_omniglot_5w1s", "iterations=20"],  # the whole meta-batch as one stacked batch
}


@dataclass
class Measured:
    tasks_per_second: float
    user: float
    system: float
    wall: float
    peak_mib: float
    faults: int


def run(setting: str, keep: bool, args: argparse.Namespace, folder: Path) -> Measured:
    """One short training run in a process of its own."""
    command = [str(Path(sys.executable).parent / "maml-train"), *SETTINGS[setting], f"data_root={args.data_root}",
               f"dataset.split_dir={args.split_dir}", "log_every=5", "val_every=1000000", "val_tasks=1", "test_tasks=1",
               "progress=false", "device=cpu", f"threads={args.threads}", f"keep_freed_memory={str(keep).lower()}",
               f"hydra.run.dir={folder}"]
    wall, usage = run_measured(command, args.threads)
    rates = [p.value for p in read_events(find_runs([folder])[0]).scalars["train/tasks_per_second"]]
    return Measured(statistics.median(rates[1:]), usage.ru_utime, usage.ru_stime, wall, usage.ru_maxrss / 1024, usage.ru_minflt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split-dir", required=True, help="the Vinyals split's class lists")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="protonet,maml,lstm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep the runs under this folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_allocator_"))
    print("| setting | keep_freed_memory | tasks/s | user s | system s | wall s | peak MiB | minor faults |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for setting in args.settings.split(","):
        rates: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for keep in (False, True):
                m = run(setting, keep, args, root / f"{setting}_{'keep' if keep else 'default'}_{repeat}")
                rates[keep].append(m.tasks_per_second)
                print(f"| {setting} | {str(keep).lower()} | {m.tasks_per_second:.2f} | {m.user:.1f} | {m.system:.1f} | {m.wall:.1f} | "
                      f"{m.peak_mib:.0f} | {m.faults:,} |", flush=True)
        ratio = statistics.median(rates[True]) / statistics.median(rates[False])
        print(f"| {setting} | kept / default (tasks/s, medians) | {ratio:.2f}x | | | | | |", flush=True)


if __name__ == "__main__":
    main()
