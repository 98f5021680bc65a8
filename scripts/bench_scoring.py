#!/usr/bin/env python
"""``maml-eval`` of one checkpoint at several ``score_every`` settings: what scoring fewer inner steps saves.

Usage:
    python scripts/bench_scoring.py CHECKPOINT [--every 1,10] [--tasks 20] [--query 15] [--repeats 2] [--threads 1]
                                    [-- maml-eval key=value ...]

Runs ``maml-eval CHECKPOINT score_every=K`` once per setting and repeat, the settings alternating (interleaved, so
that a change in the machine's load hits each alike), each in a process of its own on ``--threads`` CPU threads, and
prints each process's wall time and CPU seconds as it is measured, then the median per setting and its ratio to the
first setting. It also checks that the settings agree at the steps each scored (the same episodes, the same
weights: the same numbers). The times include the process's start-up and the dataset's loading, which every setting
pays alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from measured_process import run_measured


def evaluate(checkpoint: str, every: int, args: argparse.Namespace, output: Path) -> tuple[float, float, dict[int, float]]:
    """One ``maml-eval`` process: its wall time, its CPU seconds, and its mean metric by inner step."""
    command = [str(Path(sys.executable).parent / "maml-eval"), f"checkpoint={checkpoint}", f"score_every={every}",
               f"test_tasks={args.tasks}", f"query={args.query}", "device=cpu", f"threads={args.threads}", f"output={output}",
               *args.extra]
    wall, usage = run_measured(command, args.threads)
    report = json.loads(output.read_text())
    output.unlink()
    return wall, usage.ru_utime + usage.ru_stime, {row["inner_steps"]: row["mean"] for row in report["by_inner_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--every", default="1,10", type=lambda text: [int(k) for k in text.split(",")],
                        help="the score_every settings, the first the baseline (default: 1,10)")
    parser.add_argument("--tasks", type=int, default=20, help="test episodes per evaluation (default: 20)")
    parser.add_argument("--query", type=int, default=15, help="queries per class (default: 15)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="further maml-eval key=value arguments (after --)")
    args = parser.parse_args()
    walls: dict[int, list[float]] = {every: [] for every in args.every}
    scores: dict[int, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for every in args.every:
                wall, cpu, by_step = evaluate(args.checkpoint, every, args, Path(folder) / f"every{every}.json")
                walls[every].append(wall)
                scores[every] = by_step
                print(f"repeat {repeat + 1}, score_every={every}: {wall:.1f} s wall, {cpu:.1f} s CPU, steps scored: "
                      f"{', '.join(map(str, by_step))}", flush=True)
    baseline = statistics.median(walls[args.every[0]])
    print(f"\n{args.tasks} episodes, {args.query} queries per class, {args.threads} thread(s), {args.repeats} repeat(s):")
    print("| score_every | steps scored | median wall (s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for every in args.every:
        median = statistics.median(walls[every])
        print(f"| {every} | {len(scores[every])} | {median:.1f} | {baseline / median:.2f}x |")
    reference = scores[args.every[0]]
    for every, by_step in scores.items():
        differing = [k for k in by_step if k in reference and abs(by_step[k] - reference[k]) > 1e-6]
        if differing:
            sys.exit(f"score_every={every} disagrees with score_every={args.every[0]} at steps {differing}")
    print("The settings agree at every step both scored.")


if __name__ == "__main__":
    main()
