"""Episodes, stacks of episodes, and the objectives that score them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Episode:
    """One task: a support set to adapt on and a query set to score on.

    For classification ``*_y`` hold labels ``0..way-1`` (int64); for regression
    they hold targets of shape ``(n, 1)``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device, non_blocking=True) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


@dataclass
class EpisodeBatch:
    """Episodes of one shape stacked along a new first dimension: ``support_x`` is ``(episodes, n_support, *item)``.

    What an algorithm's ``meta_loss`` and ``evaluate`` receive: a whole meta-batch when the
    algorithm computes its episodes together, a single episode when it works one task at a time.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @classmethod
    def stack(cls, episodes: Sequence[Episode]) -> "EpisodeBatch":
        """Stack episodes of one shape; raises ``ValueError`` for none or for differing shapes."""
        if not episodes:
            raise ValueError("cannot stack zero episodes")
        return cls(*(stack([getattr(e, name) for e in episodes]) for name in ("support_x", "support_y", "query_x", "query_y")))

    def __len__(self) -> int:
        return len(self.support_x)

    def __iter__(self) -> Iterator[Episode]:
        """The episodes one at a time (views, no copies)."""
        for i in range(len(self)):
            yield Episode(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])


def stack(values: Sequence[Tensor]) -> Tensor:
    """``torch.stack(values)``; one value becomes a view, without the copy (a kernel launch on a GPU) a stack would make."""
    return values[0].unsqueeze(0) if len(values) == 1 else torch.stack(list(values))


class EpisodeSampler(Protocol):
    """Draws episodes of one split; every draw comes from the given generator."""

    def sample(self, generator: torch.Generator) -> Episode: ...


class Objective(Protocol):
    """Maps (predictions, targets) to (loss, metrics), averaging over the examples of an episode, i.e. over the last
    dimension of the labels (``(n,)`` or ``(episodes, n)``) or the second-to-last of regression targets (``(n, 1)`` or
    ``(episodes, n, 1)``): one episode gives scalars, a stack one value per episode. Metrics are detached; the loss
    keeps its graph.

    ``metrics=False`` asks for the loss alone (the metrics dict empty): the inner loop's support steps discard the
    metrics, and on a GPU every metric is kernels launched at every step.
    """

    def __call__(self, predictions: Tensor, targets: Tensor, metrics: bool = True) -> tuple[Tensor, dict[str, Tensor]]: ...


def classification_objective(logits: Tensor, labels: Tensor, metrics: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy loss; metrics: loss and accuracy, per episode."""
    if labels.dim() == 1:  # one episode: the mean in the loss's own kernel
        loss = F.cross_entropy(logits, labels)
    else:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape).mean(dim=-1)
    if not metrics:
        return loss, {}
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean(dim=-1)
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


def regression_objective(predictions: Tensor, targets: Tensor, metrics: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean squared error per episode; metrics: loss and mse (the same number, named for the logs)."""
    loss = (predictions - targets).pow(2).mean(dim=(-2, -1))
    return loss, ({"loss": loss.detach(), "mse": loss.detach()} if metrics else {})


@dataclass(frozen=True)
class TaskKind:
    """What a family of tasks is scored by, and which metric says a model is better."""

    name: str
    objective: Objective
    metric: str
    higher_is_better: bool


CLASSIFICATION = TaskKind("classification", classification_objective, "accuracy", True)
REGRESSION = TaskKind("regression", regression_objective, "mse", False)
TASK_KINDS = (CLASSIFICATION, REGRESSION)
