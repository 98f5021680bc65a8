#!/usr/bin/env python
"""Print a run's curves and final metrics from its TensorBoard events, as Markdown.

Usage: python scripts/run_summary.py outputs/runs/<run> [--every N]

Used to write docs/results.md from real runs: every number it prints is read
from the run's own event files and config.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--every", type=int, default=1, help="print every N-th validation point")
    args = parser.parse_args()
    accumulator = EventAccumulator(str(args.run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    metric = "accuracy" if "train/accuracy" in tags else "mse"
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    print(f"run: `{args.run_dir}`; split: {config['dataset'].get('split', 'n/a')}; "
          f"{config['way']}-way {config['shot']}-shot, query {config['query']}, iterations {config['iterations']}\n")
    val = {e.step: e.value for e in accumulator.Scalars(f"val/{metric}")} if f"val/{metric}" in tags else {}
    ci = {e.step: e.value for e in accumulator.Scalars(f"val/{metric}_ci95")} if val else {}
    train = {e.step: e.value for e in accumulator.Scalars(f"train/{metric}")}
    print(f"| iteration | meta-train {metric} (batch) | meta-val {metric} | 95% CI |\n|---:|---:|---:|---:|")
    for i, step in enumerate(sorted(val)):
        if i % args.every == 0 or step == max(val):
            print(f"| {step} | {train.get(step, float('nan')):.4f} | {val[step]:.4f} | {ci[step]:.4f} |")
    if not val:
        print(f"| {max(train)} | {train[max(train)]:.4f} | (no validation yet) | |")
    instance_tags = sorted(t for t in tags if t.startswith("val/accuracy_instance_"))
    if instance_tags:
        last = max(val)
        print(f"\nmeta-val accuracy by presentation index at iteration {last}: " + ", ".join(
            f"{int(t.rsplit('_', 1)[1])}: {dict((e.step, e.value) for e in accumulator.Scalars(t))[last]:.4f}" for t in instance_tags))
    if f"test/{metric}" not in tags:
        print("\n(no meta-test yet: the run has not finished)")
        return
    by_step = accumulator.Scalars(f"test/{metric}_by_inner_step")
    by_step_ci = accumulator.Scalars(f"test/{metric}_ci95_by_inner_step")
    print(f"\n| inner steps at test | meta-test {metric} | 95% CI |\n|---:|---:|---:|")
    for e, c in zip(by_step, by_step_ci):
        print(f"| {e.step} | {e.value:.4f} | {c.value:.4f} |")
    if f"test/{metric}_by_presentation" in tags:
        print(f"\n| presentation index | meta-test {metric} | 95% CI |\n|---:|---:|---:|")
        for e, c in zip(accumulator.Scalars(f"test/{metric}_by_presentation"), accumulator.Scalars(f"test/{metric}_ci95_by_presentation")):
            print(f"| {e.step} | {e.value:.4f} | {c.value:.4f} |")
    first, last = accumulator.Scalars(f"train/{metric}")[0], accumulator.Scalars(f"test/{metric}")[-1]
    print(f"\nwall time from first logged step to final test: {(last.wall_time - first.wall_time) / 60:.1f} min")


if __name__ == "__main__":
    main()
