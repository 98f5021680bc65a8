"""``maml-eval``: score a checkpoint on the fixed meta-test episodes.

Usage::

    maml-eval checkpoint=outputs/runs/<run>/best.pt [test_tasks=600] [test_inner_steps=N]
    maml-eval checkpoint=outputs/runs/<run>           # a run directory: its best.pt, else its last.pt
              [split=test|val] [way=N] [shot=K] [query=Q] [eval_seed=0] [device=auto] [data_root=DIR]
              [dataset.split_dir=DIR]                   # where the split's class lists are now, if they moved
              [dataset.root=DIR] [dataset.store_dir=DIR]  # dataset=folder's images, the decoded images, if they moved
              [output=FILE]                             # where to write the JSON (default: a name recording the settings)

Prints the mean and 95% confidence interval of the accuracy (MSE for
regression) after each number of inner steps (one row for algorithms without an
inner loop), and by presentation index for a sequence-trained LSTM, and writes
the same tables as JSON next to the checkpoint, in a file whose name records the
settings the numbers depend on (never over another evaluation's), or to output=. ``way`` may differ from the
run's only for algorithms whose network has no fixed number of outputs
(ProtoNet: a model trained on 60-way episodes scores 5-way and 20-way ones).
"""
from __future__ import annotations

import itertools
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maml_cli.build import build_algorithm, build_model, build_tasks, has_inner_loop, resolve_device
from maml_cli.checkpoint import load_checkpoint
from maml_cli.errors import UserError
from maml_cli.loop import by_presentation, evaluate
from maml_cli.suggest import explain_config_error
from maml_cli.threads import choose_threads, threads_problem

log = logging.getLogger("maml_cli")


@dataclass
class EvalDataset:
    """The dataset keys ``maml-eval`` may change: where the run's files are on this machine."""

    split_dir: Optional[str] = None  # default: the run's (the class lists of a named split, when they have moved)
    root: Optional[str] = None  # default: the run's (dataset=folder's images, when they have moved)
    store_dir: Optional[str] = None  # default: the run's (where the decoded images are kept)


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    split: str = "test"
    test_tasks: Optional[int] = None  # default: the run's test_tasks
    test_inner_steps: Optional[int] = None  # default: the run's test_inner_steps
    eval_seed: Optional[int] = None  # default: the run's eval_seed
    way: Optional[int] = None  # default: the run's way (ProtoNet can be scored at any way)
    shot: Optional[int] = None  # default: the run's shot (e.g. score a K=10-trained regressor with K=5)
    query: Optional[int] = None  # default: the run's query
    device: str = "auto"
    threads: str = "auto"  # CPU threads: auto (OMP_NUM_THREADS if set, else the CPUs this process may use) or a number
    data_root: Optional[str] = None  # default: the run's data root
    dataset: EvalDataset = field(default_factory=EvalDataset)
    output: Optional[str] = None  # the JSON file to write (refused if it exists); default: a name beside the checkpoint


def parse_args(argv: list[str]) -> EvalConfig:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"arguments are key=value pairs; not understood: {' '.join(bad)}")
    if any(a.split("=", 1)[0] == "dataset" for a in argv):
        raise UserError("maml-eval scores a run on its own dataset: dataset= cannot change it. Where the run's files are "
                        "elsewhere on this machine, give data_root=<dir> and, for a named split, dataset.split_dir=<dir>.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(argv))
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise UserError("checkpoint=<path to last.pt or best.pt> is required.")
        if cfg.split not in ("test", "val"):
            raise UserError(f"split must be test or val (got {cfg.split!r}).")
        if threads_problem(cfg.threads):
            raise UserError(threads_problem(cfg.threads) + ".")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise UserError(explain_config_error(err, groups=()) or f"{err}".replace("\n", "; ")) from err


def checkpoint_of(path: Path) -> Path:
    """``path`` itself, or for a run directory its ``best.pt`` (the best meta-validation score), else its ``last.pt``."""
    if not path.is_dir():
        return path
    for name in ("best.pt", "last.pt"):
        if (path / name).is_file():
            log.info("checkpoint=%s is a run directory: scoring its %s%s", path, name,
                     " (the best meta-validation score)" if name == "best.pt" else " (it has no best.pt)")
            return path / name
    raise UserError(f"checkpoint={path} is a directory without best.pt or last.pt; pass a run directory under outputs/runs/ "
                    f"or outputs/multirun/, or a .pt file.")


def run_eval(args: EvalConfig) -> dict:
    args.checkpoint = str(checkpoint_of(Path(args.checkpoint)))
    state = load_checkpoint(Path(args.checkpoint), map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    for key in ("test_tasks", "test_inner_steps", "eval_seed", "way", "shot", "query"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if has_inner_loop(cfg):
        cfg.algo.test_inner_steps = cfg.test_inner_steps
    elif args.test_inner_steps is not None:
        raise UserError(f"test_inner_steps does not apply to {cfg.algo._target_.rsplit('.', 1)[-1]}, which has no inner loop; "
                        f"leave it out.")
    if args.data_root is not None and "root" in cfg.dataset and cfg.dataset.root == cfg.get("data_root"):
        cfg.dataset.root = args.data_root  # the dataset's files were under the run's data_root (not dataset=folder's own root)
    moved = {"split_dir": args.dataset.split_dir, "root": args.dataset.root, "store_dir": args.dataset.store_dir}
    for key, value in moved.items():
        if value is not None:
            if key not in cfg.dataset:
                raise UserError(f"dataset.{key} does not apply to the run's dataset ({cfg.dataset._target_.rsplit('.', 1)[-1]}); leave it out.")
            cfg.dataset[key] = value
    threads, why = choose_threads(str(args.threads))
    torch.set_num_threads(threads)
    log.info("computing on %d CPU thread%s (%s)", threads, "s" * (threads != 1), why)
    device = resolve_device(args.device)
    algorithm = build_algorithm(cfg)
    tasks = build_tasks(cfg)
    way, shot, query = algorithm.episode_shape(args.split, cfg.way, cfg.shot, cfg.query)
    sampler = tasks.sampler(args.split, way, shot, query, device)
    model = build_model(cfg, tasks, algorithm, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        trained_way = state["config"]["way"]
        raise UserError(f"the network in {args.checkpoint} does not fit way={cfg.way}: it was trained with way={trained_way} and "
                        f"algo={cfg.algo._target_.rsplit('.', 1)[-1]} has a fixed number of outputs. Leave way unset or use way={trained_way}.") from err
    results = evaluate(algorithm, model, sampler, tasks.kind, cfg.test_tasks, cfg.eval_seed, device, progress=True,
                       description=f"meta-{args.split}")
    metric = tasks.kind.metric
    presentation = by_presentation(results[-1]).get(metric, {})
    return {
        "checkpoint": str(args.checkpoint), "iteration": state["iteration"], "split": args.split,
        "dataset_split": tasks.split_name, "metric": metric, "tasks": cfg.test_tasks, "eval_seed": cfg.eval_seed,
        "algo": cfg.algo._target_.rsplit(".", 1)[-1], "way": way, "shot": shot, "query": query,
        "by_inner_step": [{"inner_steps": k, "mean": r[metric][0], "ci95": r[metric][1]} for k, r in enumerate(results)],
        "by_presentation": [{"presentation": k, "mean": m, "ci95": c} for k, (m, c) in sorted(presentation.items())],
    }


def format_table(report: dict) -> str:
    metric = report["metric"]
    lines = [
        f"{report['checkpoint']} (iteration {report['iteration']}, {report['algo']}): meta-{report['split']} {metric}, "
        f"{report['way']}-way {report['shot']}-shot, {report['tasks']} tasks, eval_seed={report['eval_seed']}, split={report['dataset_split']}",
        f"{'inner steps':>11}  {metric:>10}  {'95% CI':>8}",
    ]
    for row in report["by_inner_step"]:
        lines.append(f"{row['inner_steps']:>11}  {row['mean']:>10.4f}  {row['ci95']:>8.4f}")
    if report["by_presentation"]:
        lines.append(f"{'instance':>11}  {metric:>10}  {'95% CI':>8}")
        for row in report["by_presentation"]:
            lines.append(f"{row['presentation']:>11}  {row['mean']:>10.4f}  {row['ci95']:>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console script ``maml-eval``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.output and Path(args.output).exists():
            raise output_exists(Path(args.output))
        report = run_eval(args)
    except UserError as err:
        print(f"maml-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(report))
    try:
        out = write_report(report, Path(args.checkpoint), Path(args.output) if args.output else None)
    except UserError as err:
        print(f"maml-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"written: {out}")


def output_exists(output: Path) -> UserError:
    return UserError(f"output={output} exists already; maml-eval does not write over another evaluation's results. "
                     f"Give another output= or leave it out (a name recording the settings is chosen beside the checkpoint).")


def report_name(report: dict, checkpoint: Path) -> str:
    """``eval_<checkpoint>_<split>_<way>w<shot>s_<query>q_<tasks>tasks_seed<eval_seed>[_<steps>steps]``: what an
    evaluation's numbers depend on, so that evaluations with other settings write other files."""
    steps = len(report["by_inner_step"]) - 1
    return (f"eval_{checkpoint.stem}_{report['split']}_{report['way']}w{report['shot']}s_{report['query']}q_{report['tasks']}tasks"
            f"_seed{report['eval_seed']}" + (f"_{steps}steps" if steps else ""))


def write_report(report: dict, checkpoint: Path, output: Path | None = None) -> Path:
    """Write ``report`` as JSON to ``output``, or beside the checkpoint under :func:`report_name` (``-2``, ``-3``, ...
    appended when that file exists): never over another evaluation's results.

    Raises:
        UserError: ``output`` exists already.
    """
    text = json.dumps(report, indent=2)
    if output is not None:
        try:
            with open(output, "x") as handle:
                handle.write(text)
        except FileExistsError:
            raise output_exists(output) from None
        return output
    name = report_name(report, checkpoint)
    for n in itertools.count(1):
        path = checkpoint.with_name(name + (f"-{n}" if n > 1 else "") + ".json")
        try:
            with open(path, "x") as handle:
                handle.write(text)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover


if __name__ == "__main__":
    main()
