"""The algorithm contract: what the training and evaluation loops may call, written down once."""
from __future__ import annotations

from typing import Callable, Literal, Optional, Protocol

import torch
from torch import Tensor

from maml_cli.tasks import Episode, EpisodeBatch, Objective

Params = dict[str, Tensor]
# forward(params, *inputs): the network evaluated with ``params`` instead of its own parameters. Its inputs
# and outputs depend on the network an algorithm asks for (``Algorithm.network``), hence the open signature.
Forward = Callable[..., Tensor | tuple[Tensor, tuple[Tensor, Tensor]]]
Metrics = dict[str, Tensor]
Network = Literal["classifier", "embedding", "recurrent"]


class Algorithm(Protocol):
    """A meta-learning algorithm as :mod:`maml_cli.loop` and the entry points use it.

    Attributes:
        network: what the build makes from ``model``: ``"classifier"`` (the backbone with a head of
            ``way`` outputs, 1 for regression), ``"embedding"`` (the backbone without a head) or
            ``"recurrent"`` (the head-less backbone wrapped by the algorithm's ``make_network``).
        episodes_per_call: how many episodes of a meta-batch (or of an evaluation) ``meta_loss``
            and ``evaluate`` receive at once. ``None``: as many as there are (the loops cap
            evaluation chunks), for algorithms that compute a stack of episodes in one pass; ``1``:
            one at a time, for algorithms whose per-task path is fastest or whose network must
            see one episode per call (MAML's inner loop differentiates each task's own graph, and
            conv4 with batch statistics normalises over the whole batch it is given).
        per_example_network: True when the algorithm puts several examples of one task through the
            network in one call and needs each example's output to depend on that example alone
            (the LSTM embeds a whole sequence at once; with batch statistics a later image would
            change an earlier step). The build then refuses a model that mixes examples.
        grad_clip: the meta-training loop clips the meta-gradient's norm to this; ``None``: no clipping.
    """

    network: Network
    episodes_per_call: Optional[int]
    per_example_network: bool
    grad_clip: Optional[float]

    def episode_shape(self, split: str, way: int, shot: int, query: int) -> tuple[int, int, int]:
        """``(way, shot, query)`` of the episodes of ``split`` (``train``, ``val``, ``test``) for a run's ``way``, ``shot``, ``query``."""
        ...

    def meta_loss(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
        """The differentiable meta-training loss of each episode, ``(len(episodes),)``, and per-episode metrics of the same shape."""
        ...

    def evaluate(self, forward: Forward, params: Params, episodes: EpisodeBatch, objective: Objective) -> list[Metrics]:
        """Query metrics of each episode, ``(len(episodes),)`` per metric, one dict per adaptation step
        (after 0, 1, ... inner steps; a single dict for algorithms that do not adapt by gradient steps)."""
        ...


def each_episode(task_loss: Callable[[Forward, Params, Episode, Objective], tuple[Tensor, Metrics]], forward: Forward,
                 params: Params, episodes: EpisodeBatch, objective: Objective) -> tuple[Tensor, Metrics]:
    """``meta_loss`` of an algorithm that works one task at a time: ``task_loss`` of each episode, stacked."""
    results = [task_loss(forward, params, episode, objective) for episode in episodes]
    return torch.stack([loss for loss, _ in results]), stack_metrics([metrics for _, metrics in results])


def stack_metrics(per_episode: list[Metrics]) -> Metrics:
    """``[{"accuracy": a0}, {"accuracy": a1}]`` -> ``{"accuracy": tensor([a0, a1])}``."""
    return {name: torch.stack([metrics[name] for metrics in per_episode]) for name in per_episode[0]}
