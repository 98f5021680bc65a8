"""``maml-eval``: score a checkpoint on the fixed meta-test episodes.

Usage::

    maml-eval checkpoint=outputs/runs/<run>/best.pt [test_tasks=600] [test_inner_steps=N] [score_every=K]
    maml-eval checkpoint=outputs/runs/<run>           # a run directory: its best.pt, else its last.pt
              [split=test|val] [way=N] [shot=K] [query=Q] [eval_seed=0] [device=auto] [progress=true] [data_root=DIR]
              [dataset.split_dir=DIR]                   # where the split's class lists are now, if they moved
              [dataset.root=DIR] [dataset.store_dir=DIR]  # dataset=folder's images, the decoded images, if they moved
              [output=FILE]                             # where to write the JSON (default: a name recording the settings)
              [transductive=true|false]                 # false: each query normalised with the support set alone (below)
    maml-eval checkpoint=... episodes=<folder> [test_inner_steps=N]   # tasks given as image files (below)

Prints the mean and 95% confidence interval of the accuracy (MSE for
regression) after each number of inner steps (one row for algorithms without an
inner loop; with ``score_every=K``, the run's own unless typed, after every K-th step and the last, which saves most
of the time of a long inner loop such as Reptile's 50 steps), and by presentation index for a sequence-trained LSTM, and writes
the same tables as JSON next to the checkpoint, in a file whose name records the
settings the numbers depend on (``_every<K>`` for a ``score_every`` other than 1; never over another
evaluation's), or to output=. ``way`` may differ from the
run's only for algorithms whose network has no fixed number of outputs
(ProtoNet: a model trained on 60-way episodes scores 5-way and 20-way ones). The report says whether the scored
split's classes are those the run's checkpoint records (``classes``), with a printed note when they are not.

With ``transductive=false`` (for a network with batch statistics, conv4's and ResNet-12's default) each query is put
through the network in one batch with its task's support set and no other query, and scored by its own row of that
batch (the non-transductive setting of Nichol et al. 2018): its score then depends on the support set and itself alone, not
on how many queries the episode holds. By default the run's own setting (``maml-train transductive=``, true unless the
run set it): the queries of an episode are normalised together, as in training and in Finn et al.'s evaluation. The
episodes are the same either way; the JSON's name ends in ``_nontransductive``.

With ``episodes=<folder>`` the tasks are image files, one folder per task: ``support/<class>/<images>``
with ``query/<class>/<images>`` (labelled: accuracy per task and over the tasks, with its CI) or
``query/<images>`` (unlabelled: predictions only); ``<folder>`` may also be one task itself. The images
go through the preprocessing of the run's dataset. Besides the JSON, a CSV gets one row per query image
(task, image, label if known, predicted class, its probability).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maml_cli.algorithms.base import one_query_at_a_time
from maml_cli.build import (batch_tasks_algorithms, build_algorithm, build_tasks, has_inner_loop, offers_batch_tasks, resolve_device,
                             scores_transductively, seed_problem)
from maml_cli.checkpoint import load_checkpoint
from maml_cli.data.base import class_split_changes, class_split_record
from maml_cli.data.task_folders import TaskFiles, read_task_folders
from maml_cli.errors import UserError, out_of_memory_explained
from maml_cli.learner import Learner, checkpoint_of, load
from maml_cli.loop import after_last_step, by_presentation, ci_text, evaluate, mean_ci95, strict_json
from maml_cli.suggest import explain_config_error
from maml_cli.threads import set_up_cpu, threads_problem

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
    score_every: Optional[int] = None  # default: the run's score_every (1, every step, for runs from before the key)
    eval_seed: Optional[int] = None  # default: the run's eval_seed
    way: Optional[int] = None  # default: the run's way (ProtoNet can be scored at any way)
    shot: Optional[int] = None  # default: the run's shot (e.g. score a K=10-trained regressor with K=5)
    query: Optional[int] = None  # default: the run's query
    device: str = "auto"
    threads: str = "auto"  # CPU threads: auto (OMP_NUM_THREADS if set, else the CPUs this process may use) or a number
    keep_freed_memory: bool = True  # glibc: reuse freed memory instead of returning it to the OS each step (maml_cli.allocator)
    progress: bool = True  # show the tqdm bar (false for a log file, as maml-train's progress=false)
    data_root: Optional[str] = None  # default: the run's data root
    batch_tasks: Optional[bool] = None  # default: the run's algo.batch_tasks (null: on CUDA); MAML, ANIL, Meta-SGD
    dataset: EvalDataset = field(default_factory=EvalDataset)
    output: Optional[str] = None  # the JSON file to write (refused if it exists); default: a name beside the checkpoint
    episodes: Optional[str] = None  # a folder of tasks given as image files, scored instead of sampled episodes
    transductive: Optional[bool] = None  # false: each query in one batch with its task's support set alone; default: the run's (true before the key)


# What episodes=<folder> gives itself: the tasks, their shapes and their images.
SAMPLING_KEYS = ("split", "test_tasks", "score_every", "eval_seed", "way", "shot", "query", "data_root", "dataset.split_dir", "dataset.root",
                 "dataset.store_dir")


def parse_args(argv: list[str]) -> EvalConfig:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"arguments are key=value pairs; not understood: {' '.join(bad)}")
    typed = {a.split("=", 1)[0] for a in argv}
    if "episodes" in typed and typed & set(SAMPLING_KEYS):
        raise UserError(f"episodes=<folder> gives the tasks themselves (their classes, images and shapes); "
                        f"{', '.join(k for k in SAMPLING_KEYS if k in typed)} apply only to sampled episodes: leave them out.")
    if "dataset" in typed:
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


def run_eval(args: EvalConfig) -> dict:
    args.checkpoint = str(checkpoint_of(Path(args.checkpoint)))
    state = load_checkpoint(Path(args.checkpoint), map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    for key in ("test_tasks", "test_inner_steps", "score_every", "eval_seed", "way", "shot", "query"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if has_inner_loop(cfg):
        cfg.algo.test_inner_steps = cfg.test_inner_steps
    else:
        for key in ("test_inner_steps", "score_every"):
            if getattr(args, key) is not None:
                raise UserError(f"{key} does not apply to {cfg.algo._target_.rsplit('.', 1)[-1]}, which has no inner loop; leave it out.")
    typed_transductive = args.transductive is not None
    if not typed_transductive:
        args.transductive = scores_transductively(cfg)
    if args.batch_tasks is not None:
        if not offers_batch_tasks(cfg):
            raise UserError(f"batch_tasks does not apply to {cfg.algo._target_.rsplit('.', 1)[-1]}, which does not compute tasks "
                            f"together (only {', '.join(batch_tasks_algorithms())} do); leave it out.")
        if args.batch_tasks and not args.transductive:
            raise UserError(f"transductive=false{'' if typed_transductive else ' (the run was trained with it)'} computes each task "
                            f"on its own (each query with its support set), whatever batch_tasks says: leave batch_tasks out"
                            f"{'.' if typed_transductive else ', or add transductive=true to score the queries of an episode together.'}")
        cfg.algo.batch_tasks = args.batch_tasks
    if (problem := seed_problem("eval_seed", int(cfg.eval_seed))) is not None:
        raise UserError(problem)
    score_every = int(cfg.get("score_every", 1))
    if score_every < 1:
        raise UserError(f"score_every must be at least 1 (got {score_every}): the query set is scored after every score_every-th "
                        f"inner step and the last.")
    if args.data_root is not None and "root" in cfg.dataset and cfg.dataset.root == cfg.get("data_root"):
        cfg.dataset.root = args.data_root  # the dataset's files were under the run's data_root (not dataset=folder's own root)
    moved = {"split_dir": args.dataset.split_dir, "root": args.dataset.root, "store_dir": args.dataset.store_dir}
    for key, value in moved.items():
        if value is not None:
            if key not in cfg.dataset:
                raise UserError(f"dataset.{key} does not apply to the run's dataset ({cfg.dataset._target_.rsplit('.', 1)[-1]}); leave it out.")
            cfg.dataset[key] = value
    set_up_cpu(args.threads, args.keep_freed_memory)
    device = resolve_device(args.device)
    trained_way = state["config"]["way"]
    if cfg.way != trained_way and build_algorithm(cfg).network in ("classifier", "recurrent"):
        raise UserError(f"the network in {args.checkpoint} does not fit way={cfg.way}: it was trained with way={trained_way} and "
                        f"algo={cfg.algo._target_.rsplit('.', 1)[-1]} has a fixed number of outputs. Leave way unset or use way={trained_way}.")
    learner = Learner(cfg, state["model"], device, Path(args.checkpoint), state["iteration"])
    check_transductive(args.transductive, learner)
    tasks = build_tasks(cfg)
    algorithm = learner.algorithm
    way, shot, query = algorithm.episode_shape(args.split, cfg.way, cfg.shot, cfg.query)
    sampler = tasks.sampler(args.split, way, shot, query, device)
    results = evaluate(algorithm, learner.model, sampler, tasks.kind, cfg.test_tasks, cfg.eval_seed, device, progress=args.progress,
                       description=f"meta-{args.split}", score_every=score_every, transductive=args.transductive)
    metric = tasks.kind.metric
    presentation = by_presentation(after_last_step(results)).get(metric, {})
    classes = compare_classes(state.get("class_split"), class_split_record(tasks), args.split)
    saved = state["config"]
    train_way, train_shot, train_query = algorithm.episode_shape("train", int(saved["way"]), int(saved["shot"]), int(saved["query"]))
    return {
        "checkpoint": str(args.checkpoint), "iteration": state["iteration"], "split": args.split,
        "dataset_split": tasks.split_name, "metric": metric, "tasks": cfg.test_tasks, "eval_seed": cfg.eval_seed,
        "algo": cfg.algo._target_.rsplit(".", 1)[-1], "way": way, "shot": shot, "query": query, "score_every": score_every,
        "transductive": args.transductive,
        "by_inner_step": [{"inner_steps": k, "mean": r[metric][0], "ci95": r[metric][1]} for k, r in results.items()],
        "by_presentation": [{"presentation": k, "mean": m, "ci95": c} for k, (m, c) in sorted(presentation.items())],
        "classes": classes,
        # With batch statistics a score depends on how many examples each batch holds, not only on the model.
        "batch_statistics": bool(learner.model.mixes_examples),
        "trained_episodes": {"way": train_way, "shot": train_shot, "query": train_query},
    }


def check_transductive(transductive: bool, learner: Learner) -> None:
    """Refuse ``transductive=false`` where it would change nothing (:meth:`Learner.check_non_transductive`)."""
    if not transductive:
        learner.check_non_transductive("transductive=false", "Leave transductive out.")


def compare_classes(recorded: dict | None, built: dict, split: str) -> str | None:
    """Whether the ``split`` classes scored are those the checkpoint's run recorded (:func:`class_split_record`):
    ``"the run's"``, how they differ (scoring other classes is legitimate, but the report says so), ``"not recorded"``
    for a checkpoint from before the record, or ``None`` for a family without classes (sinusoid)."""
    if split not in built:
        return None
    if recorded is None:
        return "not recorded"
    changes = class_split_changes({split: recorded[split]} if split in recorded else {}, {split: built[split]})
    return "; ".join(changes) if changes else "the run's"


@dataclass
class Prediction:
    """One query image's row of the predictions CSV."""

    task: str
    image: str
    label: Optional[str]
    prediction: str
    probability: float


def score_task(learner: Learner, task: TaskFiles, root: Path, transductive: bool = True) -> tuple[list[float], list[Prediction]]:
    """One task of an episodes folder: its query accuracy after each inner step (empty when its queries are unlabelled)
    and a prediction per query image, after the last step (with ``transductive`` false, each query predicted in one batch
    with the support set alone: :func:`~maml_cli.algorithms.base.one_query_at_a_time`)."""
    try:
        support_x = learner.preprocess([image for image, _ in task.support])
        classes, predictors = learner.adaptations(support_x, [label for _, label in task.support])
        query_x = learner.preprocess([image for image, _ in task.query])
    except UserError as err:
        raise UserError(f"task {root / task.name}: {err}") from err
    if not transductive:
        predictors = (one_query_at_a_time(predict, support_x, learner.algorithm.queries_with_support) for predict in predictors)
    elif len(query_x) == 1 and learner.queries_normalised_together:
        log.warning("task %s has a single query: with batch statistics it is normalised on its own, unlike the queries of "
                    "training episodes, and its score may differ from what it gets among other queries", task.name)
    labels = [label for _, label in task.query]
    truth = torch.tensor([classes.index(label) for label in labels]) if task.labelled else None
    accuracies, outputs = [], None
    for predict in predictors:
        outputs = predict(query_x).cpu()
        if truth is not None:  # scored as sampled episodes are, by the task kind's own objective
            accuracies.append(float(learner.inputs.kind.objective(outputs, truth)[1]["accuracy"]))
    probabilities = outputs.softmax(dim=-1)
    best, chosen = probabilities.max(dim=-1)
    rows = [Prediction(task.name, image.relative_to(root).as_posix(), label, str(classes[c]), p)
            for (image, label), c, p in zip(task.query, chosen.tolist(), best.tolist())]
    return accuracies, rows


def run_episodes(args: EvalConfig) -> tuple[dict, list[Prediction]]:
    """Score (labelled queries) and predict (all queries) the tasks of ``args.episodes`` with the checkpoint."""
    set_up_cpu(args.threads, args.keep_freed_memory)
    learner = load(args.checkpoint, args.device)
    args.checkpoint = str(learner.checkpoint)
    if learner.inputs.kind.name != "classification":
        raise UserError(f"episodes=<folder> holds images to classify; {args.checkpoint} was trained on {learner.inputs.kind.name}. "
                        f"Use the Python API (maml_cli.load) with tensors.")
    if args.test_inner_steps is not None:
        learner = learner.with_inner_steps(args.test_inner_steps)
    if args.transductive is None:
        args.transductive = learner.transductive
    check_transductive(args.transductive, learner)
    root = Path(args.episodes).expanduser()
    tasks = read_task_folders(root)
    per_task, predictions = [], []
    for task in tasks:
        accuracies, rows = score_task(learner, task, root, args.transductive)
        predictions += rows
        per_task.append({"task": task.name, "way": len({c for _, c in task.support}), "support": len(task.support),
                         "query": len(task.query), "labelled": task.labelled,
                         "accuracy_by_inner_step": accuracies})
    scored_tasks = [t["accuracy_by_inner_step"] for t in per_task if t["labelled"]]
    by_step = [mean_ci95([steps[k] for steps in scored_tasks]) for k in range(len(scored_tasks[0]))] if scored_tasks else []
    report = {
        "checkpoint": args.checkpoint, "iteration": learner.iteration, "episodes": str(root.resolve()), "algo": learner.name,
        "metric": "accuracy", "tasks": len(scored_tasks), "unlabelled_tasks": len(tasks) - len(scored_tasks),
        "inner_steps": learner.inner_steps, "transductive": args.transductive,
        "by_inner_step": [{"inner_steps": k, "mean": m, "ci95": c} for k, (m, c) in enumerate(by_step)],
        "per_task": per_task,
    }
    return report, predictions


def format_episodes_table(report: dict) -> str:
    lines = [f"{report['checkpoint']} (iteration {report['iteration']}, {report['algo']}) on the tasks of {report['episodes']}: "
             f"{report['tasks']} with labelled queries, {report['unlabelled_tasks']} without" + non_transductive_text(report)]
    if report["by_inner_step"]:
        lines.append(f"{'inner steps':>11}  {'accuracy':>10}  {'95% CI':>8}")
        lines += [f"{row['inner_steps']:>11}  {row['mean']:>10.4f}  {ci_text(row['ci95']):>8}" for row in report["by_inner_step"]]
    return "\n".join(lines)


def format_table(report: dict) -> str:
    metric = report["metric"]
    lines = [
        f"{report['checkpoint']} (iteration {report['iteration']}, {report['algo']}): meta-{report['split']} {metric}, "
        f"{report['way']}-way {report['shot']}-shot, {report['tasks']} tasks, eval_seed={report['eval_seed']}, split={report['dataset_split']}"
        + non_transductive_text(report),
        f"{'inner steps':>11}  {metric:>10}  {'95% CI':>8}",
    ]
    if report.get("classes") not in (None, "the run's", "not recorded"):
        lines.insert(1, f"note: not the run's {report['split']} classes: {report['classes']}")
    if (note := batch_statistics_note(report)) is not None:
        lines.insert(1, note)
    for row in report["by_inner_step"]:
        lines.append(f"{row['inner_steps']:>11}  {row['mean']:>10.4f}  {ci_text(row['ci95']):>8}")
    if report["by_presentation"]:
        lines.append(f"{'instance':>11}  {metric:>10}  {'95% CI':>8}")
        for row in report["by_presentation"]:
            lines.append(f"{row['presentation']:>11}  {row['mean']:>10.4f}  {ci_text(row['ci95']):>8}")
    return "\n".join(lines)


def non_transductive_text(report: dict) -> str:
    """What a table's first line adds for ``transductive=false``."""
    return "" if report.get("transductive", True) else "; non-transductive: each query in one batch with the support set alone"


def batch_statistics_note(report: dict) -> str | None:
    """The table's note when the network normalises with each batch's own statistics and the scored episodes are shaped
    otherwise than the training episodes: its batches then hold other numbers of examples, and the same model scores
    differently (docs/results.md measures it for MAML on Omniglot); with ``transductive=false``, always (each query is
    normalised with the support set, never with the other queries as in training)."""
    trained = report["trained_episodes"]
    def shape(episodes: dict) -> str:
        return f"{episodes['way']}-way {episodes['shot']}-shot with {episodes['query']} quer{'y' if episodes['query'] == 1 else 'ies'} per class"
    if report["batch_statistics"] and not report.get("transductive", True):
        return (f"note: the network normalises each batch with the batch's own statistics; here each query is normalised in one batch with the "
                f"{report['way'] * report['shot']} support images and no other query, while in training the queries of an episode ({shape(trained)}) "
                f"were normalised together")
    if not report["batch_statistics"] or all(report[key] == trained[key] for key in trained):
        return None
    return (f"note: the network normalises each batch with the batch's own statistics, so its score depends on the episodes' shape "
            f"as well as on the model: it trained on {shape(trained)}, these are {shape(report)}")


def main(argv: list[str] | None = None) -> None:
    """Console script ``maml-eval``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.output:
            check_output(Path(args.output), bool(args.episodes))
        predictions = None
        with out_of_memory_explained("batch_tasks"):
            if args.episodes:
                report, predictions = run_episodes(args)
            else:
                report = run_eval(args)
    except UserError as err:
        print(f"maml-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_episodes_table(report) if predictions is not None else format_table(report))
    try:
        written = write_report(report, Path(args.checkpoint), Path(args.output) if args.output else None, predictions)
    except UserError as err:
        print(f"maml-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(f"written: {path}")


def check_output(output: Path, with_predictions: bool) -> None:
    """Refuse, before any work, an ``output=`` that cannot be written or would replace another evaluation's results.

    Raises:
        UserError: its folder is missing, it (or, for ``episodes=``, the CSV beside it) exists, or it does not end in
            ``.json`` where a CSV of the same name goes beside it.
    """
    if not output.parent.is_dir():
        raise UserError(f"output={output}: the folder {output.parent} does not exist.")
    if with_predictions and output.suffix != ".json":
        raise UserError(f"output={output}: with episodes= give a .json name; the predictions go beside it, in the same name with .csv.")
    for path in (output, output.with_suffix(".csv")) if with_predictions else (output,):
        if path.exists():
            raise output_exists(path)


def output_exists(output: Path) -> UserError:
    return UserError(f"output={output} exists already; maml-eval does not write over another evaluation's results. "
                     f"Give another output= or leave it out (a name recording the settings is chosen beside the checkpoint).")


def report_name(report: dict, checkpoint: Path) -> str:
    """``eval_<checkpoint>_<split>_<way>w<shot>s_<query>q_<tasks>tasks_seed<eval_seed>[_<steps>steps[_every<k>]]``, or for tasks
    given as files ``eval_<checkpoint>_episodes-<folder name>[_<steps>steps]``: what an evaluation's numbers depend on,
    so that evaluations with other settings write other files; ``_nontransductive`` at the end for ``transductive=false``."""
    mode = "" if report.get("transductive", True) else "_nontransductive"
    if "episodes" in report:
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(report["episodes"]).name) or "episodes"
        steps = report["inner_steps"]
        return f"eval_{checkpoint.stem}_episodes-{folder}" + (f"_{steps}steps" if steps else "") + mode
    steps = report["by_inner_step"][-1]["inner_steps"]
    every = report.get("score_every", 1)
    return (f"eval_{checkpoint.stem}_{report['split']}_{report['way']}w{report['shot']}s_{report['query']}q_{report['tasks']}tasks"
            f"_seed{report['eval_seed']}" + (f"_{steps}steps" if steps else "") + (f"_every{every}" if steps and every != 1 else "") + mode)


def predictions_csv(predictions: list[Prediction]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "image", "label", "prediction", "probability"])
    writer.writerows([p.task, p.image, p.label or "", p.prediction, f"{p.probability:.6f}"] for p in predictions)
    return out.getvalue()


def write_new(files: dict[Path, str]) -> bool:
    """Write each file only if none of them exists yet (created exclusively); False when one already did."""
    written: list[Path] = []
    try:
        for path, text in files.items():
            with open(path, "x") as handle:
                written.append(path)
                handle.write(text)
    except FileExistsError:
        for path in written:
            path.unlink()
        return False
    return True


def write_report(report: dict, checkpoint: Path, output: Path | None = None, predictions: list[Prediction] | None = None) -> list[Path]:
    """Write ``report`` as JSON (and ``predictions`` as a CSV beside it, same name but ``.csv``) to ``output``, or beside
    the checkpoint under :func:`report_name` (``-2``, ``-3``, ... appended when that name is taken): never over another
    evaluation's results.

    Returns:
        The files written.

    Raises:
        UserError: ``output`` (or its CSV) exists already.
    """
    def files(json_path: Path) -> dict[Path, str]:
        document = {**report, **({"predictions": str(json_path.with_suffix(".csv"))} if predictions is not None else {})}
        written = {json_path: json.dumps(strict_json(document), indent=2, allow_nan=False)}
        if predictions is not None:
            written[json_path.with_suffix(".csv")] = predictions_csv(predictions)
        return written

    if output is not None:
        if not write_new(files(output)):
            raise output_exists(output)
        return list(files(output))
    name = report_name(report, checkpoint)
    for n in itertools.count(1):
        path = checkpoint.with_name(name + (f"-{n}" if n > 1 else "") + ".json")
        if write_new(files(path)):
            return list(files(path))
    raise AssertionError("unreachable")  # pragma: no cover


if __name__ == "__main__":
    main()
