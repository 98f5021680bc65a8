"""A trained meta-learner applied to new few-shot tasks, from Python.

    import maml_cli

    learner = maml_cli.load("outputs/runs/<run>/best.pt")        # a checkpoint, or a run directory
    model = learner.adapt(["cat1.png", "dog1.png", "owl1.png", "fox1.png", "elk1.png"],
                          ["cat", "dog", "owl", "fox", "elk"])    # one labelled image per class (5-way 1-shot)
    model.predict(["q1.png", "q2.png"])                           # ['dog', 'owl']
    model.probabilities(["q1.png", "q2.png"])                     # (2, 5), columns in model.classes order
    model.predict(["q1.png"], transductive=False)                 # each query normalised with the support set alone

No data root is needed: the network is rebuilt from the checkpoint's config, and images go through
the preprocessing of the dataset it was trained on (:meth:`Learner.preprocess`: channels, size and
inversion exactly as at training). ``maml-eval`` scores checkpoints through the same code
(:func:`load`, and each algorithm's ``adaptations``).
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from maml_cli.algorithms.base import Algorithm, Predictor, one_query_at_a_time
from maml_cli.build import build_algorithm, build_model, check_non_transductive, has_inner_loop, resolve_device, scores_transductively
from maml_cli.checkpoint import load_checkpoint
from maml_cli.data.base import ImageInputs, Inputs
from maml_cli.data.registry import registered_dataset_by_target
from maml_cli.data.store import decode_image
from maml_cli.errors import UserError
from maml_cli.loop import functional_forward

log = logging.getLogger("maml_cli")

ImageLike = Union[str, Path, Image.Image]
# A task's examples: a tensor already preprocessed (``(n, C, H, W)`` in [0, 1], or ``(n, features)``), or image files.
Examples = Union[Tensor, Sequence[ImageLike]]


def checkpoint_of(path: Path) -> Path:
    """``path`` itself, or for a run directory its ``best.pt`` (the best meta-validation score), else its ``last.pt``.

    Raises:
        UserError: a directory without either.
    """
    if not path.is_dir():
        return path
    for name in ("best.pt", "last.pt"):
        if (path / name).is_file():
            log.info("checkpoint=%s is a run directory: using its %s%s", path, name,
                     " (the best meta-validation score)" if name == "best.pt" else " (it has no best.pt)")
            return path / name
    raise UserError(f"checkpoint={path} is a directory without best.pt or last.pt; pass a run directory under outputs/runs/ "
                    f"or outputs/multirun/, or a .pt file.")


def dataset_inputs(cfg: DictConfig) -> Inputs:
    """What the run's networks take in, from its ``dataset`` node alone (no data needed).

    Raises:
        UserError: the run's dataset is not one this version of maml-cli knows.
    """
    entry = registered_dataset_by_target(cfg.dataset._target_)
    if entry is None:
        raise UserError(f"the run's dataset {cfg.dataset._target_} is not a dataset this version of maml-cli knows, so its "
                        f"input preprocessing is unknown.")
    return entry.inputs(cfg.dataset)


def load(checkpoint: Union[str, Path], device: str = "cpu") -> "Learner":
    """The meta-learner saved in ``checkpoint`` (a ``.pt`` file, or a run directory: its ``best.pt``, else ``last.pt``).

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Raises:
        UserError: the file is missing or not a maml-cli checkpoint.
    """
    path = checkpoint_of(Path(checkpoint).expanduser())
    state = load_checkpoint(path, map_location="cpu")
    return Learner(OmegaConf.create(state["config"]), state["model"], resolve_device(device), path, int(state["iteration"]))


class Learner:
    """A trained meta-learner: adapts to a new task from its support set and predicts its queries.

    Built by :func:`load`. Attributes: ``config`` (the run's config), ``algorithm``, ``model`` (the trained
    network), ``inputs`` (what the network takes in), ``way`` (the classes of a task, for algorithms whose
    network has a fixed number of outputs: MAML and its family, the LSTM; ProtoNet takes any number),
    ``inner_steps`` (the inner steps :meth:`adapt` takes by default: the run's ``test_inner_steps``; 0 for
    algorithms without an inner loop), ``checkpoint`` and ``iteration``.
    """

    def __init__(self, config: DictConfig, model_state: dict[str, Tensor], device: torch.device, checkpoint: Path, iteration: int) -> None:
        self.config, self.device, self.checkpoint, self.iteration = config, device, checkpoint, iteration
        self.inputs = dataset_inputs(config)
        self.algorithm: Algorithm = build_algorithm(config, device)
        self.model = build_model(config, self.inputs, self.algorithm, device)
        try:
            self.model.load_state_dict(model_state)
        except RuntimeError as err:
            raise UserError(f"the network in {checkpoint} does not match the network its own config builds ({err}).") from err
        self.model.requires_grad_(False)  # the meta-parameters are not learned here; inner loops differentiate their own copies
        self.way: Optional[int] = int(config.way) if self.algorithm.network in ("classifier", "recurrent") else None
        self.inner_steps = int(config.test_inner_steps) if has_inner_loop(config) else 0
        # A classifier with batch statistics normalises the queries of a call together (ProtoNet normalises them
        # with the support set, the LSTM's embedding each image on its own).
        self.queries_normalised_together = self.algorithm.network == "classifier" and bool(self.model.mixes_examples)
        # How the run scored its queries (maml-train transductive=): what prediction does unless told otherwise.
        self.transductive = scores_transductively(config)

    @property
    def name(self) -> str:
        """The algorithm's class name (``MAML``, ``ProtoNet``, ...)."""
        return type(self.algorithm).__name__

    def preprocess(self, images: Sequence[ImageLike]) -> Tensor:
        """Image files (or PIL images) as the network's input ``(n, C, H, W)`` in [0, 1] on the learner's device:
        grayscale or RGB, resized and inverted exactly as the training images were.

        Raises:
            UserError: the run was not trained on images, or an image cannot be read (naming it).
        """
        if not isinstance(self.inputs, ImageInputs):
            raise UserError(f"this {self.name} model was trained on vectors of {self.inputs.in_features} values, not images; pass tensors.")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        size, channels, invert = self.inputs.image_size, self.inputs.in_channels, self.inputs.invert
        pixels = np.stack([decode_image(image if isinstance(image, Image.Image) else Path(image), size, channels, invert) for image in images])
        return torch.from_numpy(pixels).to(self.device).float().div_(255)

    def as_inputs(self, examples: Examples) -> Tensor:
        """``examples`` on the learner's device as the network's input: a tensor as it is, image files preprocessed.

        Raises:
            UserError: a tensor whose shape is not the network's input shape.
        """
        if not isinstance(examples, Tensor):
            return self.preprocess(examples)
        if not examples.is_floating_point():
            raise UserError(f"the network takes floating-point inputs (preprocess's output: pixels scaled to [0, 1]); got a tensor of "
                            f"{examples.dtype}. Divide 8-bit pixels by 255, or pass the image files.")
        expected = ((self.inputs.in_channels, self.inputs.image_size, self.inputs.image_size) if isinstance(self.inputs, ImageInputs)
                    else (self.inputs.in_features,))
        if examples.dim() != len(expected) + 1 or tuple(examples.shape[1:]) != expected:
            raise UserError(f"the network takes a batch of shape (n, {', '.join(map(str, expected))}); got {tuple(examples.shape)}.")
        with torch.inference_mode(False):  # a copy that autograd may use, even from a tensor made under inference mode
            return examples.to(self.device, torch.get_default_dtype()).clone()

    def with_inner_steps(self, steps: int) -> "Learner":
        """The same learner adapting with ``steps`` inner steps (it shares the network)."""
        if steps == self.inner_steps:
            return self
        if not has_inner_loop(self.config):
            raise UserError(f"{self.name} has no inner loop; leave the number of inner steps out.")
        if steps < 0:
            raise UserError(f"the number of inner steps must be at least 0 (got {steps}).")
        other = copy.copy(self)  # the same network
        other.config = copy.deepcopy(self.config)
        other.config.test_inner_steps = other.config.algo.test_inner_steps = steps
        other.algorithm, other.inner_steps = build_algorithm(other.config, self.device), steps
        return other

    def check_non_transductive(self, asked: str, advice: str) -> None:
        """Refuse non-transductive prediction (``asked``: how it was asked for) where it would change nothing
        (:func:`~maml_cli.build.check_non_transductive`)."""
        check_non_transductive(self.model, self.name, asked, advice)

    def adaptations(self, support: Examples, labels: Union[Tensor, Sequence[Hashable]]) -> tuple[list[Hashable], Iterator[Predictor]]:
        """The task's classes (in the order of the output columns; none for regression) and a predictor of its queries
        after 0, 1, ..., :attr:`inner_steps` inner steps (one for algorithms without an inner loop).

        Class labels may be any sortable values (names, numbers); the output columns follow their sorted order, so
        labels 0..way-1 keep their numbers.
        """
        support_x = self.as_inputs(support)
        if self.inputs.kind.name == "regression":
            targets = torch.as_tensor(labels, dtype=support_x.dtype, device=self.device)
            if targets.numel() != len(support_x):
                raise UserError(f"{len(support_x)} support examples but {targets.numel()} target values; give one target per example.")
            targets = targets.reshape(len(support_x), 1)
            classes: list[Hashable] = []
            support_y = targets
        else:
            if isinstance(labels, Tensor) and labels.dim() != 1:
                raise UserError(f"class labels are one per example, a 1-D tensor or a list; got a tensor of shape {tuple(labels.shape)}.")
            values = labels.tolist() if isinstance(labels, Tensor) else list(labels)
            if len(values) != len(support_x):
                raise UserError(f"{len(support_x)} support examples but {len(values)} labels; give one label per example.")
            try:
                classes = sorted(set(values))
            except TypeError as err:
                raise UserError(f"the support labels must be of one kind (all names or all numbers): {err}.") from err
            if self.way is not None and len(classes) != self.way:
                raise UserError(f"this {self.name} model was trained on {self.way}-way tasks and its network has {self.way} outputs; the "
                                f"support set has {len(classes)} classes ({', '.join(map(str, classes[:8]))}{', ...' if len(classes) > 8 else ''}). "
                                f"Give {self.way} classes.")
            if len(classes) < 2:
                raise UserError("a few-shot task needs at least 2 classes in its support set.")
            index = {label: i for i, label in enumerate(classes)}
            support_y = torch.tensor([index[v] for v in values], device=self.device)
        objective = self.inputs.kind.objective
        return classes, self.algorithm.adaptations(functional_forward(self.model), dict(self.model.named_parameters()), support_x, support_y, objective)

    def adapt(self, support: Examples, labels: Union[Tensor, Sequence[Hashable]], inner_steps: Optional[int] = None) -> "AdaptedLearner":
        """The learner adapted to one task from its labelled support set.

        Args:
            support: the support examples: image files, PIL images, or a preprocessed tensor.
            labels: one label per support example: class names or numbers (classification), target values (regression).
            inner_steps: inner steps to take (default :attr:`inner_steps`, the run's ``test_inner_steps``).

        Raises:
            UserError: labels and examples do not match, or the task has another number of classes than the network's outputs.
        """
        learner = self if inner_steps is None else self.with_inner_steps(inner_steps)
        with torch.inference_mode(False), torch.enable_grad():  # inner steps differentiate, whatever the caller's mode
            support_x = learner.as_inputs(support)
            classes, predictors = learner.adaptations(support_x, labels)
            *_, predict = predictors
        return AdaptedLearner(learner, classes, predict, support_x)


@dataclass
class AdaptedLearner:
    """A learner adapted to one task: scores and predicts its queries. Built by :meth:`Learner.adapt`.

    With batch statistics (conv4's and ResNet-12's default, as in Finn et al.), the queries given together are
    normalised together, as the queries of an episode were in training and evaluation; give a task's queries in
    one call. (A query alone is normalised on its own, and its scores differ from those it gets among the task's
    other queries. ProtoNet normalises the queries with the support set, and the LSTM each image on its own.)
    With ``transductive=False`` each query goes through the network in one batch with the support set and no other
    query (Nichol et al.'s non-transductive setting, ``maml-eval transductive=false``), one pass per query: its scores
    then do not depend on the other queries given with it (refused for a network without batch statistics, where
    nothing would change). Left out, it is the run's own setting (``maml-train transductive=``; true unless the run
    set it), as for ``maml-eval``.

    Attributes:
        classes: the task's classes, in the order of the score columns (empty for regression).
    """

    learner: Learner
    classes: list[Hashable]
    predictor: Predictor
    support_x: Tensor  # the support set as the network's input

    def scores(self, query: Examples, transductive: Optional[bool] = None) -> Tensor:
        """Class scores (logits) ``(n, classes)``, columns in :attr:`classes` order."""
        self._classification("scores")
        return self._outputs(query, transductive)

    def probabilities(self, query: Examples, transductive: Optional[bool] = None) -> Tensor:
        """Class probabilities ``(n, classes)`` (the softmax of :meth:`scores`)."""
        self._classification("probabilities")
        return self._outputs(query, transductive).softmax(dim=-1)

    def predict(self, query: Examples, transductive: Optional[bool] = None) -> Union[list[Hashable], Tensor]:
        """The predicted class of each query (a label from :attr:`classes`); for regression, the values ``(n, 1)``."""
        outputs = self._outputs(query, transductive)
        if not self.classes:
            return outputs
        return [self.classes[i] for i in outputs.argmax(dim=-1).tolist()]

    def _outputs(self, query: Examples, transductive: Optional[bool]) -> Tensor:
        """The network's outputs for the queries, on the CPU: scores ``(n, classes)``, or regression values ``(n, 1)``."""
        query_x = self.learner.as_inputs(query)
        if transductive is None:
            transductive = self.learner.transductive
        if not transductive:
            self.learner.check_non_transductive("transductive=False", "Leave it out.")
            with torch.inference_mode(False):
                return one_query_at_a_time(self.predictor, self.support_x, self.learner.algorithm.queries_with_support)(query_x).cpu()
        if len(query_x) == 1 and self.learner.queries_normalised_together:
            warnings.warn("a single query through a network with batch statistics is normalised on its own, unlike the queries "
                          "of training episodes, and its scores differ; give a task's queries together (see AdaptedLearner).",
                          stacklevel=3)
        with torch.inference_mode(False):
            return self.predictor(query_x).cpu()

    def _classification(self, what: str) -> None:
        if not self.classes:
            raise UserError(f"{what} are for classification; this model does regression: use predict().")
