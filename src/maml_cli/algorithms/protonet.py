"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

A class is represented by the mean embedding of its support images (its
prototype); a query is scored by its negative squared Euclidean distance to each
prototype, and the loss is the cross-entropy over those scores. There is no inner
loop: ``inner_lr`` and ``inner_steps`` do not apply.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor

from maml_cli.algorithms.base import AlgorithmDefaults, Forward, Metrics, Params, Predictor, each_episode
from maml_cli.algorithms.registry import at_least, register_algorithm
from maml_cli.tasks import Episode, EpisodeBatch, Objective

DISTANCES = ("euclidean", "cosine")


class Distance(str, enum.Enum):
    euclidean = "euclidean"
    cosine = "cosine"


@dataclass
class ProtoNetConfig:
    _target_: str = "maml_cli.algorithms.protonet.ProtoNet"
    distance: Distance = Distance.euclidean
    cosine_scale: float = 10.0
    train_way: int = at_least(1, MISSING)
    train_shot: int = at_least(1, MISSING)
    train_query: int = at_least(1, MISSING)


def prototypes(support_embeddings: Tensor, support_y: Tensor, way: int) -> Tensor:
    """Mean support embedding of each class: ``(way, embedding_size)``."""
    members = F.one_hot(support_y, way).to(support_embeddings.dtype)  # (n_support, way)
    return (members.T @ support_embeddings) / members.sum(dim=0)[:, None]


def prototype_logits(query_embeddings: Tensor, class_prototypes: Tensor, distance: str = "euclidean",
                     cosine_scale: float = 10.0) -> Tensor:
    """Scores ``(n_query, way)``: negative squared Euclidean distances, or scaled cosine similarities."""
    if distance == "euclidean":
        return -(query_embeddings[:, None, :] - class_prototypes[None, :, :]).pow(2).sum(dim=-1)
    if distance == "cosine":
        return cosine_scale * F.cosine_similarity(query_embeddings[:, None, :], class_prototypes[None, :, :], dim=-1)
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


class ProtoNet(AlgorithmDefaults):
    """Prototypical Networks: classify queries by their distance to class-mean embeddings.

    The network is the backbone without a head (conv4's flattened features). Support
    and query images are embedded in one batch, as in the authors' code, so batch
    normalisation sees the whole episode.

    Args:
        distance: ``euclidean`` (squared, as in the paper) or ``cosine``.
        cosine_scale: multiplies cosine similarities, which lie in [-1, 1], to make usable logits.
        train_way, train_shot, train_query: the shape of meta-training episodes
            (e.g. 60-way with 5 queries for Omniglot, as in the paper); meta-validation
            and meta-test use the run's ``way``/``shot``/``query``.

    Example:
        >>> protonet = ProtoNet(train_way=60, train_shot=1, train_query=5)
        >>> losses, metrics = protonet.meta_loss(forward, params, EpisodeBatch.stack([episode]), classification_objective)
    """

    network = "embedding"
    inner_loop = False
    outer = "loss"
    queries_with_support = True  # the support set and the queries are embedded in one batch
    # conv4 with batch statistics normalises over the whole batch it is given: one episode per call.
    episodes_per_call = 1

    def __init__(self, distance: str = "euclidean", cosine_scale: float = 10.0, train_way: int = 5,
                 train_shot: int = 1, train_query: int = 1) -> None:
        if distance not in DISTANCES:
            raise ValueError(f"algo.distance={distance!r} is not one of {', '.join(DISTANCES)}")
        self.distance = distance
        self.cosine_scale = cosine_scale
        self.train_way, self.train_shot, self.train_query = train_way, train_shot, train_query

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """Meta-training episodes have their own shape; the others use the run's."""
        return (self.train_way, self.train_shot, self.train_query) if split == "train" else (way, shot, query)

    def query_logits(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Prototype scores ``(n_query, way)`` of the queries, support and queries embedded in one batch."""
        n_support = len(support_x)
        embeddings = forward(params, torch.cat([support_x, query_x]))
        way = int(support_y.max()) + 1
        class_prototypes = prototypes(embeddings[:n_support], support_y, way)
        return prototype_logits(embeddings[n_support:], class_prototypes, self.distance, self.cosine_scale)

    def task_loss(self, forward: Forward, params: Params, episode: Episode, objective: Objective) -> tuple[Tensor, Metrics]:
        """Cross-entropy of the query set under the prototype scores."""
        return objective(self.query_logits(forward, params, episode.support_x, episode.support_y, episode.query_x), episode.query_y)

    def adaptations(self, forward: Forward, params: Params, support_x: Tensor, support_y: Tensor, objective: Objective) -> Iterator[Predictor]:
        """One predictor: the prototype scores, computed with the queries (the support set and the queries share
        one batch, and with batch statistics the queries given together change the prototypes)."""

        def predict(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return self.query_logits(forward, params, support_x, support_y, query_x)

        yield predict

    def meta_loss(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        """:meth:`task_loss` of each episode."""
        return each_episode(self.task_loss, forward, params, episodes, objective)

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective,
                 score_every: Optional[int] = 1) -> dict[int, Metrics]:
        """Query metrics of each episode; a single entry (step 0; ``score_every`` does not apply), since there is no adaptation step."""
        with torch.no_grad():
            _, metrics = self.meta_loss(forward, params, episodes, objective)
        return {0: metrics}


register_algorithm("protonet", ProtoNetConfig, ProtoNet)
