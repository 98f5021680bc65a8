"""A black-box recurrent meta-learner (Hochreiter, Younger & Conwell 2001; Santoro et al. 2016).

An LSTM reads a task as a sequence. At step t it sees the input x_t together with
the label of step t-1 (one-hot for classification, the target value for
regression; zeros at t=0) and predicts the label of x_t. Labels are permuted
afresh in every episode, so the only way to be right is to learn, within the
sequence, which input went with which label: the learning happens in the
LSTM's state, and meta-training shapes how.

Two protocols:

- ``sequence`` (Santoro et al.): the episode is ``way`` classes, each presented
  ``presentations`` times in shuffled order; the loss covers every step, and
  accuracy is reported by presentation index (1st, 2nd, ... instance of a class).
- ``support_query``: the support set is read as above; every query is then
  classified from the state after the support set, in one step whose label
  channel holds the last support label (queries do not see each other). This
  gives an N-way K-shot accuracy comparable to MAML's and ProtoNet's.

A sequence is embedded in one batch, so the embedding must treat each input on
its own for the above to hold: on Omniglot conv4 normalises each image by itself
(``model.batch_norm=example``, set for ``algo=lstm`` in ``conf/algo_dataset/``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_cli.algorithms.maml import Forward, Params
from maml_cli.models import Identity, RecurrentLearner
from maml_cli.tasks import Episode, Objective

PROTOCOLS = ("sequence", "support_query")


def label_channel(targets: Tensor, label_size: int, dtype: torch.dtype) -> Tensor:
    """Labels as the LSTM reads them: one-hot rows for class indices, the values themselves for regression targets."""
    if targets.dtype in (torch.int64, torch.int32):
        return F.one_hot(targets, label_size).to(dtype)
    return targets.reshape(len(targets), -1).to(dtype)


def previous_labels(channel: Tensor) -> Tensor:
    """Row t holds row t-1 of ``channel``; row 0 is zeros. Never the current label."""
    return torch.cat([torch.zeros_like(channel[:1]), channel[:-1]])


def presentation_index(labels: Tensor) -> Tensor:
    """For each step, how many times its class has been shown so far, this step included (1 = first instance)."""
    seen = F.one_hot(labels).cumsum(dim=0)
    return seen.gather(1, labels[:, None]).squeeze(1)


def accuracy_by_presentation(logits: Tensor, labels: Tensor, presentations: int) -> dict[str, Tensor]:
    """Accuracy over the steps showing the k-th instance of their class, for k = 1..presentations.

    Keys are ``accuracy_instance_01``, ``accuracy_instance_02``, ... (two digits, so they sort).
    """
    correct = (logits.detach().argmax(dim=-1) == labels).float()
    index = presentation_index(labels)
    return {f"accuracy_instance_{k:02d}": correct[index == k].mean() for k in range(1, presentations + 1)}


class RecurrentMetaLearner:
    """Meta-train an LSTM to learn a task from a sequence of labelled examples.

    Args:
        protocol: ``sequence`` or ``support_query`` (see the module docstring).
        presentations: instances of each class in a ``sequence`` episode (10 in Santoro et al.).
        hidden_size, layers: size and depth of the LSTM.
        grad_clip: the meta-training loop clips the gradient norm to this (recurrent
            networks need it); ``None`` for no clipping.
        embedding: ``backbone``: the model without its head embeds each input;
            ``raw``: the flattened input itself (sinusoid's x).

    Example:
        >>> learner = RecurrentMetaLearner(protocol="sequence", presentations=10)
        >>> loss, metrics = learner.meta_loss(forward, params, episode, classification_objective)
    """

    network = "recurrent"

    def __init__(self, protocol: str = "support_query", presentations: int = 10, hidden_size: int = 200, layers: int = 1,
                 grad_clip: float | None = 10.0, embedding: str = "backbone") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"algo.protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.presentations = presentations
        self.hidden_size, self.layers = hidden_size, layers
        self.grad_clip = grad_clip
        self.embedding = embedding

    def make_network(self, backbone: nn.Module, embedding_size: int, input_size: int, label_size: int, out_features: int) -> nn.Module:
        """The LSTM over the backbone's features (or the raw input) and a label channel of ``label_size``."""
        if self.embedding == "raw":
            backbone, embedding_size = Identity(), input_size
        return RecurrentLearner(backbone, embedding_size, label_size, out_features, self.hidden_size, self.layers)

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """``sequence`` episodes are ``way`` classes x ``presentations`` instances and no separate query set."""
        return (way, self.presentations, 0) if self.protocol == "sequence" else (way, shot, query)

    def _read_support(self, forward: Forward, params: Params, episode: Episode) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        # The label channel is as wide as the output: the way, or 1 for regression.
        label_size = params["head.weight"].shape[0]
        channel = label_channel(episode.support_y, label_size, episode.support_x.dtype)
        outputs, state = forward(params, episode.support_x[None], previous_labels(channel)[None])
        return outputs[0], channel, state

    def predictions(self, forward: Forward, params: Params, episode: Episode) -> tuple[Tensor, Tensor]:
        """The outputs that are scored, with their targets: every step (``sequence``) or the queries (``support_query``)."""
        support_outputs, channel, (h, c) = self._read_support(forward, params, episode)
        if self.protocol == "sequence":
            return support_outputs, episode.support_y
        n_query = len(episode.query_x)
        label_in = channel[-1].expand(n_query, 1, channel.shape[1])
        state = (h.expand(-1, n_query, -1).contiguous(), c.expand(-1, n_query, -1).contiguous())
        query_outputs, _ = forward(params, episode.query_x[:, None], label_in, state)
        return query_outputs[:, 0], episode.query_y

    def _score(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        outputs, targets = self.predictions(forward, params, episode)
        loss, metrics = objective(outputs, targets)
        if self.protocol == "sequence" and not targets.is_floating_point():
            metrics.update(accuracy_by_presentation(outputs, targets, self.presentations))
        return loss, metrics

    def meta_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of the scored outputs; the meta-gradient flows through the whole sequence."""
        return self._score(forward, params, episode, objective)

    def evaluate(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> list[dict[str, Tensor]]:
        """Metrics of one episode; a single entry, since the learning happens inside the forward pass."""
        with torch.no_grad():
            _, metrics = self._score(forward, params, episode, objective)
        return [metrics]
