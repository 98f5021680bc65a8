"""Networks of the MAML paper, written to be called functionally.

The modules own their parameters only so that ``torch.func.functional_call``
can swap in adapted parameters; nothing in this package mutates them during
adaptation.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor, nn


class BatchNormMode(str, enum.Enum):
    """Which statistics batch normalisation uses.

    ``batch``: the statistics of the batch being normalised, at meta-training and
    meta-test alike, with no running averages (Finn et al. 2017). The support set
    and the query set of a task are therefore normalised separately.
    """

    batch = "batch"


class BatchStatNorm(nn.Module):
    """Batch normalisation over the current batch, with a learned scale and shift.

    Written from mean, variance and ``rsqrt`` instead of ``F.batch_norm``: under
    ``vmap`` the batching rule of batch-norm backward gives wrong second-order
    gradients, while these elementary ops are exact.

    Args:
        channels: number of feature channels (dimension 1 of the input).
        eps: added to the variance for numerical stability.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def _norm(channels: int, mode: BatchNormMode) -> nn.Module:
    mode = BatchNormMode(mode)
    if mode is BatchNormMode.batch:
        return BatchStatNorm(channels)
    raise ValueError(f"unknown batch-norm mode {mode!r}")  # pragma: no cover - enum is exhaustive


class Conv4(nn.Module):
    """The four-block convolutional network of Finn et al. (2017) and Vinyals et al. (2016).

    Each block is a 3x3 convolution with ``hidden`` filters, batch normalisation,
    ReLU and 2x2 max-pooling; a linear head maps the flattened features to
    ``out_features`` logits (``out_features=0`` drops the head, leaving the embedding).

    Args:
        in_channels: image channels (1 for Omniglot).
        out_features: number of classes of a task (the ``way``), or 0 for no head.
        hidden: filters per convolution.
        image_size: side of the square input images; sets the head's input size.
        batch_norm: which statistics batch normalisation uses.

    Example:
        >>> net = Conv4(1, 5)
        >>> net(torch.zeros(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        batch_norm: BatchNormMode = BatchNormMode.batch,
    ) -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        side = image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                _norm(hidden, batch_norm),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = hidden
            side //= 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 poolings (needs at least 16)")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.embedding_size = hidden * side * side
        self.head = nn.Linear(self.embedding_size, out_features) if out_features > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Fully connected ReLU network; 1-40-40-1 is the sinusoid regressor of Finn et al. (2017).

    Args:
        in_features: input size.
        out_features: output size.
        hidden: sizes of the hidden layers.
    """

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: tuple[int, ...] = (40, 40)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = in_features
        for width in hidden:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
