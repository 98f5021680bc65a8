"""A black-box recurrent meta-learner (Hochreiter, Younger & Conwell 2001; Santoro et al. 2016).

An LSTM reads a task as a sequence of inputs, each with a label channel (one-hot
for classification, the target value for regression), and predicts labels.
Two protocols:

- ``sequence`` (Santoro et al.): the episode is ``way`` classes, each presented
  ``presentations`` times in shuffled order. At step t the LSTM sees x_t with the
  label of step t-1 (one-hot for classification, the target value for regression;
  zeros at t=0) and predicts the label of x_t: the one-step delay is the point of
  the set-up, since the label of x_t arrives only after x_t has been scored. The
  loss covers every step, and accuracy is reported by presentation index (1st,
  2nd, ... instance of a class).
- ``support_query`` (N-way K-shot, as black-box few-shot learners read a task:
  Mishra et al. 2018, Garnelo et al. 2018): the support set is labelled data, so
  each support step carries its own label; every query is then classified from the
  state after the support set, in one step whose label channel is empty (zeros), so
  queries do not see each other. This gives an N-way K-shot accuracy comparable to
  MAML's and ProtoNet's. The embeddings are centred on the support set's mean
  (``centre``), which the support set allows since it is read whole before any
  query is scored; in ``sequence`` each step is centred on the mean of the steps
  up to it.

Labels are permuted afresh in every episode, so the only way to be right is to
learn, within the sequence, which input went with which label: the learning
happens in the LSTM's state, and meta-training shapes how.

All episodes of a meta-batch go through the network together: their inputs are
embedded in one pass and the LSTM runs them as one batch of sequences. The
embedding must therefore compute each input on its own (``per_example_network``):
the build gives conv4 per-example normalisation and refuses a model that mixes
the examples of a batch, where a later image would change an earlier step's output.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from maml_cli.algorithms.base import AlgorithmDefaults, Forward, Metrics, Params, Predictor
from maml_cli.algorithms.registry import at_least, register_algorithm
from maml_cli.errors import UserError
from maml_cli.models import Backbone, Identity, RecurrentLearner
from maml_cli.tasks import EpisodeBatch, Objective

PROTOCOLS = ("sequence", "support_query")


class Protocol(str, enum.Enum):
    sequence = "sequence"
    support_query = "support_query"


class Embedding(str, enum.Enum):
    backbone = "backbone"
    raw = "raw"


@dataclass
class LSTMConfig:
    _target_: str = "maml_cli.algorithms.lstm.RecurrentMetaLearner"
    protocol: Protocol = Protocol.support_query
    presentations: int = at_least(1, 10)
    hidden_size: int = at_least(1, 200)
    layers: int = at_least(1, 1)
    forget_bias: float = 1.0
    centre: Optional[bool] = True  # null: what runs saved before sequence could centre meant (see RecurrentMetaLearner)
    label_scale: Optional[float] = None
    grad_clip: Optional[float] = 10.0
    embedding: Embedding = Embedding.backbone
    train_query: Optional[int] = at_least(1, None)


def label_channel(targets: Tensor, label_size: int, dtype: torch.dtype, hot: float = 1.0) -> Tensor:
    """Labels as the LSTM reads them, ``(..., steps, label_size)``: one-hot rows with ``hot`` as the hot
    entry for class indices ``(..., steps)``, the values themselves for regression targets ``(..., steps, 1)``."""
    if not targets.is_floating_point():
        return F.one_hot(targets, label_size).to(dtype) * hot
    return targets.to(dtype)


def previous_labels(channel: Tensor) -> Tensor:
    """Step t holds step t-1 of ``channel`` (steps are the second-to-last dimension); step 0 is zeros. Never the current label."""
    return torch.cat([torch.zeros_like(channel[..., :1, :]), channel[..., :-1, :]], dim=-2)


def presentation_index(labels: Tensor) -> Tensor:
    """For each step of ``(..., steps)`` labels, how many times its class has been shown so far, this step included (1 = first instance)."""
    seen = F.one_hot(labels).cumsum(dim=-2)
    return seen.gather(-1, labels[..., None]).squeeze(-1)


def accuracy_by_presentation(logits: Tensor, labels: Tensor, presentations: int) -> Metrics:
    """Accuracy over the steps showing the k-th instance of their class, for k = 1..presentations, per episode.

    Keys are ``accuracy_instance_01``, ``accuracy_instance_02``, ... (two digits, so they sort).
    """
    correct = (logits.detach().argmax(dim=-1) == labels).float()
    index = presentation_index(labels)
    metrics = {}
    for k in range(1, presentations + 1):
        shown = (index == k).float()
        metrics[f"accuracy_instance_{k:02d}"] = (correct * shown).sum(dim=-1) / shown.sum(dim=-1)
    return metrics


class RecurrentMetaLearner(AlgorithmDefaults):
    """Meta-train an LSTM to learn a task from a sequence of labelled examples.

    Args:
        protocol: ``sequence`` or ``support_query`` (see the module docstring).
        presentations: instances of each class in a ``sequence`` episode (10 in Santoro et al.).
        hidden_size, layers: size and depth of the LSTM.
        forget_bias: initial bias of the LSTM's forget gates (see :class:`~maml_cli.models.RecurrentLearner`).
        centre: centre the embeddings and bring them to a fixed norm before the LSTM reads them.
            ``support_query`` centres on the support set's mean embedding, the queries on the same mean;
            ``sequence`` scores every step, so each step is centred on the mean of the steps up to it and
            never on a later one (see :class:`~maml_cli.models.RecurrentLearner`). Without it,
            meta-training on Omniglot sat at chance for thousands of updates (docs/results.md). ``None``
            is what runs saved before ``sequence`` could centre meant: on for ``support_query``, off for
            ``sequence`` (the configs now say true or false). A 1-wide input (sinusoid's raw x) cannot be
            centred: its fixed norm would leave only its sign.
        label_scale: the hot entry of a one-hot label; ``None``: the square root of the embedding's
            width, about the norm of an embedding whose units are of order one (conv4's 64 features
            have a norm near 9 at initialisation). With a hot entry of 1 the label is a small part of
            what the gates see, and meta-training sits at chance for thousands of updates before the
            LSTM starts to bind labels to inputs (docs/results.md). Regression targets are read as they are.
        grad_clip: the meta-training loop clips the gradient norm to this (recurrent
            networks need it); ``None`` for no clipping.
        embedding: ``backbone``: the model without its head embeds each input;
            ``raw``: the flattened input itself (sinusoid's x).
        train_query: ``support_query``: queries per class of meta-training episodes (``None``: the run's
            ``query``); meta-validation and meta-test use the run's ``query``. Queries cost an embedding
            each, and one per class is enough signal to train on.

    Example:
        >>> learner = RecurrentMetaLearner(protocol="sequence", presentations=10)
        >>> losses, metrics = learner.meta_loss(forward, params, EpisodeBatch.stack(episodes), classification_objective)
    """

    network = "recurrent"
    inner_loop = False
    outer = "loss"
    episodes_per_call = None
    per_example_network = True
    queries_with_support = True  # a predictor reads the support sequence, then the queries

    def __init__(self, protocol: str = "support_query", presentations: int = 10, hidden_size: int = 200, layers: int = 1,
                 forget_bias: float = 1.0, centre: bool | None = True, label_scale: float | None = None,
                 grad_clip: float | None = 10.0, embedding: str = "backbone", train_query: int | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"algo.protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.centre = protocol == "support_query" if centre is None else centre
        self.protocol = protocol
        self.presentations = presentations
        self.hidden_size, self.layers, self.forget_bias = hidden_size, layers, forget_bias
        self.label_scale = label_scale
        self.grad_clip = grad_clip
        self.embedding = embedding
        self.train_query = train_query

    def make_network(self, backbone: Backbone, input_size: int, label_size: int, out_features: int,
                     embedding_chunk: int | None = None) -> RecurrentLearner:
        """The LSTM over the backbone's features (or the raw input of ``input_size``) and a label channel of ``label_size``.

        ``embedding_chunk``: see :class:`~maml_cli.models.RecurrentLearner`.
        """
        embedding = Identity(input_size) if self.embedding == "raw" else backbone
        if self.centre and embedding.embedding_size < 2:
            raise UserError(f"algo.centre=true needs an embedding at least 2 wide; this one is {embedding.embedding_size} wide "
                            f"(algo.embedding={self.embedding}), and centring it would leave only its sign. Set algo.centre=false.")
        return RecurrentLearner(embedding, embedding.embedding_size, label_size, out_features, self.hidden_size, self.layers,
                                self.forget_bias, embedding_chunk)

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """``sequence`` episodes are ``way`` classes x ``presentations`` instances and no separate query set;
        ``support_query`` meta-training episodes have ``train_query`` queries per class."""
        if self.protocol == "sequence":
            return way, self.presentations, 0
        return way, shot, self.train_query if split == "train" and self.train_query is not None else query

    def predictions(self, forward: Forward, params: Params, episodes: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """The outputs that are scored, with their targets: every step (``sequence``) or the queries (``support_query``),
        ``(episodes, steps, outputs)`` and ``(episodes, steps)`` (``(episodes, steps, 1)`` for regression)."""
        # The label channel is as wide as the output (the way, or 1 for regression); the rest of the LSTM's input is the embedding.
        label_size = params["head.weight"].shape[0]
        embedding_width = params["lstm.weight_ih_l0"].shape[1] - label_size
        hot = self.label_scale if self.label_scale is not None else math.sqrt(embedding_width)
        support = label_channel(episodes.support_y, label_size, episodes.support_x.dtype, hot)
        if self.protocol == "sequence":
            # forward takes the network's inputs positionally: (x, label_in, query_x, centre).
            outputs, _ = forward(params, episodes.support_x, previous_labels(support), None, "running" if self.centre else "off")
            return outputs, episodes.support_y
        _, query_outputs = forward(params, episodes.support_x, support, episodes.query_x, "whole" if self.centre else "off")
        return query_outputs, episodes.query_y

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """One predictor: the LSTM reads the support set, then classifies each query from that state (``support_query``).

        Raises:
            UserError: the ``sequence`` protocol, which scores every step of one labelled sequence and has no queries.
        """
        if self.protocol == "sequence":
            raise UserError("this LSTM was meta-trained with algo.protocol=sequence: it scores each step of one labelled sequence "
                            "(accuracy by presentation) and has no set of queries to predict. Score it with maml-eval on sampled "
                            "episodes, or meta-train with algo.protocol=support_query (N-way K-shot) to predict new queries.")

        def predict(query_x: Tensor) -> Tensor:
            # The queries never see each other (each is read from the state after the support set), and their labels are not read.
            episode = EpisodeBatch(support_x[None], support_y[None], query_x[None], support_y.new_zeros((1, len(query_x), *support_y.shape[1:])))
            with torch.no_grad():
                return self.predictions(forward, params, episode)[0][0]

        yield predict

    def _score(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        outputs, targets = self.predictions(forward, params, episodes)
        losses, metrics = objective(outputs, targets)
        if self.protocol == "sequence" and not targets.is_floating_point():
            metrics.update(accuracy_by_presentation(outputs, targets, self.presentations))
        return losses, metrics

    def meta_loss(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        """The loss of each episode's scored outputs; the meta-gradient flows through the whole sequence."""
        return self._score(forward, params, episodes, objective)

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective,
                 score_every: Optional[int] = 1) -> dict[int, Metrics]:
        """Metrics of each episode; a single entry (step 0; ``score_every`` does not apply), since the learning happens inside the forward pass."""
        with torch.no_grad():
            _, metrics = self._score(forward, params, episodes, objective)
        return {0: metrics}


register_algorithm("lstm", LSTMConfig, RecurrentMetaLearner)
