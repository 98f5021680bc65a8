"""Episodes and the objectives that score them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

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


class EpisodeSampler(Protocol):
    """Draws episodes of one split; every draw comes from the given generator."""

    def sample(self, generator: torch.Generator) -> Episode: ...


# An objective maps (predictions, targets) to (loss, metrics). Metrics are
# detached scalar tensors; the loss keeps its graph.
Objective = Callable[[Tensor, Tensor], "tuple[Tensor, dict[str, Tensor]]"]


def classification_objective(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy loss; metrics: loss and accuracy."""
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


def regression_objective(predictions: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean squared error; metrics: loss and mse (the same number, named for the logs)."""
    loss = F.mse_loss(predictions, targets)
    return loss, {"loss": loss.detach(), "mse": loss.detach()}


@dataclass(frozen=True)
class TaskKind:
    """What a family of tasks is scored by, and which metric says a model is better."""

    name: str
    objective: Objective
    metric: str
    higher_is_better: bool


CLASSIFICATION = TaskKind("classification", classification_objective, "accuracy", True)
REGRESSION = TaskKind("regression", regression_objective, "mse", False)
