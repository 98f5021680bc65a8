"""Networks of the MAML paper, written to be called functionally.

The modules own their parameters only so that ``torch.func.functional_call``
can swap in adapted parameters; nothing in this package mutates them during
adaptation.
"""
from __future__ import annotations

import enum
import threading
from contextlib import contextmanager
from typing import Iterator, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Backbone(Protocol):
    """What the build and the algorithms rely on in a model built from ``conf/model/``.

    Attributes:
        embedding_size: width of the features the model computes before its head (what an
            ``embedding`` or ``recurrent`` network is built on).
        mixes_examples: True when an example's output depends on the other examples of the batch
            (conv4 with batch statistics). An algorithm with ``per_example_network`` refuses such a model.

    A model built with a head keeps it as its submodule ``head`` (its parameters are ``head.*``), and
    ``model(x, "body")`` / ``model(features, "head")`` run the two parts on their own (ANIL adapts the
    head on features computed once).
    """

    embedding_size: int
    mixes_examples: bool

    def __call__(self, x: Tensor, part: "Part" = "all") -> Tensor: ...


class PassMark:
    """A per-thread mark on the forward passes run inside ``with mark:`` (tasks run concurrently on threads,
    ``tasks_at_once``, do not see each other's); ``bool(mark)`` says whether the current pass carries it."""

    def __init__(self) -> None:
        self._state = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._state, "on", False)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        previous = bool(self)
        self._state.on = True
        try:
            yield
        finally:
            self._state.on = previous


# Forward passes whose graph will itself be differentiated (MAML's inner loop at second order). conv4 computes them in
# the contiguous layout even when it is channels-last: on a 2-core CPU a second-order step ran 1.06-1.23x slower
# channels-last, while a pass differentiated once ran 1.26-1.86x faster (``scripts/bench_conv4_layout.py``).
differentiated_twice = PassMark()
# Forward passes run under ``torch.func.vmap`` over the tasks of a meta-batch (``algo.batch_tasks``). BatchStatNorm then
# normalises with mean, variance and ``rsqrt`` written out, whose second-order gradients under vmap are exact by
# construction; the fused kernel's batching rule is a torch internal the meta-gradient does not rely on.
batched_over_tasks = PassMark()


def in_differentiated_twice() -> bool:
    return bool(differentiated_twice)


def computes_channels_last(channels_last: bool) -> bool:
    """Whether a network built with ``channels_last`` computes the current pass channels-last: not in passes marked
    :func:`differentiated_twice` (slower there), nor under ``vmap`` over tasks (which has no memory formats)."""
    return channels_last and not differentiated_twice and not batched_over_tasks


# Which part of a classifier to run: all of it, the body (features), or the head on given features (ANIL's inner loop).
Part = Literal["all", "body", "head"]


class BatchNormMode(str, enum.Enum):
    """Which statistics the normalisation layers of conv4 use.

    ``batch``: the statistics of the batch being normalised, at meta-training and
    meta-test alike, with no running averages (Finn et al. 2017). The support set
    and the query set of a task are therefore normalised separately.

    ``example``: each example over its own channels and positions (a group norm
    with one group), so an output never depends on the other inputs of the batch.
    The recurrent learner needs this: it embeds a whole sequence in one batch,
    and with batch statistics a later image would change an earlier step's output.
    """

    batch = "batch"
    example = "example"


class BatchStatNorm(nn.Module):
    """Batch normalisation over the current batch, with a learned scale and shift and no running statistics.

    ``F.batch_norm`` in training mode without running buffers: the fused kernel made
    conv4 1.5-1.9x faster on a 2-core CPU than the same normalisation written from
    mean, variance and ``rsqrt`` (``scripts/bench_conv4_layout.py``), and its double
    backward is exact when tasks are processed one at a time (the MAML
    finite-difference tests check it). Passes marked :func:`batched_over_tasks`
    use the elementary formulation instead (the batched meta-gradient is checked
    against the task-by-task one in float64).

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
        if x.numel() == x.shape[1]:
            # One value per channel is its own mean: it normalises to zero (F.batch_norm refuses it).
            shape = [1, -1] + [1] * (x.dim() - 2)
            return (x - x) * self.weight.view(shape) + self.bias.view(shape)
        if batched_over_tasks:
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dim=dims, keepdim=True)
            centred = x - mean
            variance = centred.pow(2).mean(dim=dims, keepdim=True)  # biased, as F.batch_norm normalises with
            shape = [1, -1] + [1] * (x.dim() - 2)
            return centred * torch.rsqrt(variance + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class ExampleNorm(BatchStatNorm):
    """Normalisation of each example over its channels and positions, with a learned per-channel scale and shift."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


def _norm(channels: int, mode: BatchNormMode) -> nn.Module:
    mode = BatchNormMode(mode)
    if mode is BatchNormMode.batch:
        return BatchStatNorm(channels)
    if mode is BatchNormMode.example:
        return ExampleNorm(channels)
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
        channels_last: compute in the channels-last memory format, except passes marked
            :func:`differentiated_twice` or run under ``vmap`` over tasks (:func:`computes_channels_last`). On a 2-core CPU a forward+backward ran 1.26-1.86x
            faster channels-last and a second-order step 1.06-1.23x slower
            (``scripts/bench_conv4_layout.py``, docs/performance.md).

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
        channels_last: bool = False,
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
        self.mixes_examples = BatchNormMode(batch_norm) is BatchNormMode.batch
        # Only activations change layout: channels-last weights would make the convolutions of
        # passes marked differentiated_twice channels-last as well.
        self.channels_last = channels_last

    def forward(self, x: Tensor, part: Part = "all") -> Tensor:
        """Logits of images ``x`` (``part="all"``), their features (``"body"``), or the head applied to features ``x`` (``"head"``)."""
        if part == "head":
            return self.head(x)
        if computes_channels_last(self.channels_last):
            # A one-channel image is laid out the same either way, so the first convolution
            # returns contiguous output; converting each convolution's output (a no-op once the
            # input is channels-last) carries the whole network channels-last.
            h = x
            for layer in self.features:
                h = layer(h)
                if isinstance(layer, nn.Conv2d):
                    h = h.contiguous(memory_format=torch.channels_last)
        else:
            h = self.features(x)
        return h if part == "body" else self.head(h)


class ResidualBlock(nn.Module):
    """One block of ResNet-12: three 3x3 convolutions with normalisation and LeakyReLU(0.1), a 1x1 shortcut, 2x2 max-pooling.

    The third convolution's normalised output is added to the shortcut before the last LeakyReLU.

    Args:
        in_channels: channels of the block's input.
        out_channels: filters of each convolution.
        batch_norm: which statistics the normalisation layers use.
    """

    def __init__(self, in_channels: int, out_channels: int, batch_norm: BatchNormMode) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=3, padding=1, bias=False)
                                   for c in (in_channels, out_channels, out_channels))
        self.norms = nn.ModuleList(_norm(out_channels, batch_norm) for _ in range(3))
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.shortcut_norm = _norm(out_channels, batch_norm)

    def forward(self, x: Tensor, layout: torch.memory_format = torch.contiguous_format) -> Tensor:
        """``layout``: the memory format of every convolution's output (a no-op once the input has it)."""
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h).contiguous(memory_format=layout))
            if i < 2:
                h = F.leaky_relu(h, 0.1)
        shortcut = self.shortcut_norm(self.shortcut(x).contiguous(memory_format=layout))
        return F.max_pool2d(F.leaky_relu(h + shortcut, 0.1), 2)


class ResNet12(nn.Module):
    """ResNet-12, the backbone of TADAM (Oreshkin et al. 2018), MetaOptNet (Lee et al. 2019) and FEAT (Ye et al. 2020).

    Four :class:`ResidualBlock` s of ``hidden[i]`` filters, each halving the image side, then global
    average pooling to an embedding of ``hidden[-1]`` features (FEAT's and most recent papers'
    convention; MetaOptNet flattens the last feature map instead) and a linear head of
    ``out_features`` logits (``out_features=0`` drops the head, leaving the embedding). Convolutions
    start from Kaiming-normal weights (fan-out, leaky ReLU), as in MetaOptNet and FEAT. MetaOptNet's
    DropBlock regularisation is not included.

    Args:
        in_channels: image channels (1 for Omniglot).
        out_features: number of classes of a task (the ``way``), or 0 for no head.
        hidden: filters of the four blocks (64, 160, 320, 640 in MetaOptNet and FEAT).
        image_size: side of the square input images; at least 16, for four 2x2 poolings.
        batch_norm: which statistics the normalisation layers use.
        channels_last: compute in the channels-last memory format, except passes marked
            :func:`differentiated_twice` or run under ``vmap`` over tasks (:func:`computes_channels_last`) (as :class:`Conv4`).

    Example:
        >>> net = ResNet12(1, 5, hidden=(8, 8, 16, 16))
        >>> net(torch.zeros(10, 1, 28, 28)).shape
        torch.Size([10, 5])
        >>> net(torch.zeros(10, 1, 28, 28), "body").shape
        torch.Size([10, 16])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: tuple[int, ...] = (64, 160, 320, 640),
        image_size: int = 28,
        batch_norm: BatchNormMode = BatchNormMode.batch,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in hidden]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"hidden={list(hidden)} must be four positive filter counts, one per block (e.g. [64, 160, 320, 640])")
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 poolings (needs at least 16)")
        self.blocks = nn.ModuleList(ResidualBlock(c, w, batch_norm) for c, w in zip([in_channels, *widths[:-1]], widths))
        for module in self.blocks.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
        self.embedding_size = widths[-1]
        self.head = nn.Linear(self.embedding_size, out_features) if out_features > 0 else nn.Identity()
        self.mixes_examples = BatchNormMode(batch_norm) is BatchNormMode.batch
        self.channels_last = channels_last

    def forward(self, x: Tensor, part: Part = "all") -> Tensor:
        """Logits of images ``x`` (``part="all"``), their features (``"body"``), or the head applied to features ``x`` (``"head"``)."""
        if part != "head":
            layout = torch.channels_last if computes_channels_last(self.channels_last) else torch.contiguous_format
            for block in self.blocks:
                x = block(x, layout)
            x = x.mean(dim=(2, 3))
        return x if part == "body" else self.head(x)


class MLP(nn.Module):
    """Fully connected ReLU network; 1-40-40-1 is the sinusoid regressor of Finn et al. (2017). Over images it reads
    each one flattened (Finn et al.'s non-convolutional Omniglot network has hidden layers of 256, 128, 64 and 64).

    Args:
        in_features: input size; or, for images, ``in_channels`` and ``image_size``.
        out_features: output size, or 0 for no output layer (the last hidden layer is the embedding).
        hidden: sizes of the hidden layers.
    """

    def __init__(self, in_features: int | None = None, out_features: int = 1, hidden: tuple[int, ...] = (40, 40),
                 in_channels: int | None = None, image_size: int | None = None) -> None:
        super().__init__()
        if (in_features is None) == (in_channels is None or image_size is None):
            raise ValueError("MLP takes in_features (vectors), or in_channels and image_size (images)")
        layers: list[nn.Module] = []
        size = in_features if in_features is not None else in_channels * image_size ** 2
        for width in hidden:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.embedding_size = size
        self.mixes_examples = False
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(size, out_features) if out_features > 0 else nn.Identity()
        self._register_load_state_dict_pre_hook(self._rename_single_sequential)

    def _rename_single_sequential(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Checkpoints written before the body/head split held one Sequential, ``net``: its last Linear was the head.
        old = [k for k in state_dict if k.startswith(prefix + "net.")]
        if not old:
            return
        last = max(int(k[len(prefix) + 4:].split(".")[0]) for k in old)
        for key in old:
            index, leaf = key[len(prefix) + 4:].split(".", 1)
            has_head = isinstance(self.head, nn.Linear)
            new = f"{prefix}head.{leaf}" if has_head and int(index) == last else f"{prefix}body.{index}.{leaf}"
            state_dict[new] = state_dict.pop(key)

    def forward(self, x: Tensor, part: Part = "all") -> Tensor:
        """Outputs of inputs ``x`` (``part="all"``), their last hidden layer (``"body"``), or the head on such features (``"head"``)."""
        if part == "head":
            return self.head(x)
        h = self.body(x.flatten(1))
        return h if part == "body" else self.head(h)


class Identity(nn.Module):
    """No network: the flattened input is the embedding (the recurrent learner on sinusoid reads x itself).

    Args:
        input_size: the flattened size of an input, which is the embedding's.
    """

    mixes_examples = False

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.embedding_size = input_size

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class RecurrentLearner(nn.Module):
    """A black-box meta-learner: an LSTM that reads a task as a sequence (Hochreiter et al. 2001; Santoro et al. 2016).

    Each step sees an input's embedding together with a label channel (one-hot for
    classification, the target value for regression; which label, and when, is the
    algorithm's protocol) and predicts the current label. Everything it learns about a
    task lives in its state.

    Args:
        embedding: maps a batch of inputs ``(n, *item)`` to ``(n, embedding_size)``, each input on its own.
        embedding_size: width of the embedding.
        label_size: width of the label channel (the way, or 1 for regression).
        out_features: outputs per step (the way, or 1 for regression).
        hidden_size, layers: size and depth of the LSTM.
        forget_bias: the forget gates' initial bias. PyTorch's initialisation puts it near 0, so that a cell
            keeps about half its content per step and what the first support examples wrote has all but
            vanished a few steps later; a positive bias (Gers et al. 2000; Jozefowicz et al. 2015) starts
            the LSTM remembering. The bias is learned from there.
        embedding_chunk: embed the inputs of a call this many at a time (``None``: all at once). The
            embedding computes each input on its own, so chunks give the same result; on a CPU small
            chunks keep conv4's activations in cache (docs/performance.md), on a GPU one large call is faster.
    """

    def __init__(self, embedding: Backbone, embedding_size: int, label_size: int, out_features: int,
                 hidden_size: int = 200, layers: int = 1, forget_bias: float = 0.0, embedding_chunk: int | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.mixes_examples = embedding.mixes_examples
        self.embedding_chunk = embedding_chunk
        self.lstm = nn.LSTM(embedding_size + label_size, hidden_size, num_layers=layers, batch_first=True)
        with torch.no_grad():
            for layer in range(layers):
                # Gates are stacked (input, forget, cell, output) in each bias; the two biases add up.
                getattr(self.lstm, f"bias_ih_l{layer}")[hidden_size:2 * hidden_size] = forget_bias
                getattr(self.lstm, f"bias_hh_l{layer}")[hidden_size:2 * hidden_size] = 0.0
        self.head = nn.Linear(hidden_size, out_features)

    def embed(self, inputs: Tensor) -> Tensor:
        """``(n, *item)`` inputs to ``(n, embedding_size)`` features, ``embedding_chunk`` at a time."""
        if self.embedding_chunk and len(inputs) > self.embedding_chunk:
            return torch.cat([self.embedding(part) for part in inputs.split(self.embedding_chunk)])
        return self.embedding(inputs)

    def forward(self, x: Tensor, label_in: Tensor, query_x: Tensor | None = None,
                centre: Literal["off", "whole", "running"] = "off") -> tuple[Tensor, Tensor | None]:
        """Read a batch of sequences, then answer queries from where each sequence left off.

        Args:
            x: ``(batch, steps, *item)`` inputs, read in order.
            label_in: ``(batch, steps, label_size)``: the label channel of each step.
            query_x: ``(batch, queries, *item)`` or None. Each query is answered in one step of its own
                from the state after its sequence's last step, with an empty (zero) label channel, so
                queries never see each other.
            centre: ``off``; ``whole``: centre every embedding (queries' included) on the mean embedding of its
                sequence's steps, for a sequence read whole before any scored output (a support set);
                ``running``: centre each step on the mean of its sequence's steps up to and including it, so no
                step sees a later input (the first step of a sequence becomes zero). Centred embeddings are
                scaled to the norm sqrt(embedding_size) (Wang et al. 2019's CL2N, on the set being read).
                Random conv features share a large common component (different Omniglot characters are nearly
                parallel at initialisation: ``scripts/embedding_similarity.py``); what tells them apart is left after centring,
                and the fixed norm keeps it on the scale of the label channel.

        Returns:
            The outputs of every step ``(batch, steps, out_features)``, and of every query
            ``(batch, queries, out_features)`` (None without queries).
        """
        batch, steps = x.shape[:2]
        inputs = x.reshape(batch * steps, *x.shape[2:])
        queries = 0 if query_x is None else query_x.shape[1]
        if query_x is not None:
            inputs = torch.cat([inputs, query_x.reshape(batch * queries, *query_x.shape[2:])])
        features = self.embed(inputs)  # one pass over every image of the batch
        sequence_features = features[: batch * steps].reshape(batch, steps, -1)
        query_features = features[batch * steps:].reshape(batch, queries, features.shape[-1])
        width = sequence_features.shape[-1] ** 0.5
        if centre == "whole":
            mean = sequence_features.mean(dim=1, keepdim=True)
            sequence_features = F.normalize(sequence_features - mean, dim=-1) * width
            query_features = F.normalize(query_features - mean, dim=-1) * width
        elif centre == "running":
            seen = torch.arange(1, steps + 1, device=x.device, dtype=sequence_features.dtype).reshape(1, steps, 1)
            mean_so_far = sequence_features.cumsum(dim=1) / seen
            sequence_features = F.normalize(sequence_features - mean_so_far, dim=-1) * width
            query_features = F.normalize(query_features - mean_so_far[:, -1:], dim=-1) * width
        elif centre != "off":
            raise ValueError(f"centre={centre!r} is not one of off, whole, running")
        hidden, (h, c) = self.lstm(torch.cat([sequence_features, label_in], dim=-1))
        if query_x is None:
            return self.head(hidden), None
        state = (h.repeat_interleave(queries, dim=1), c.repeat_interleave(queries, dim=1))
        empty = label_in.new_zeros(batch * queries, 1, label_in.shape[-1])
        query_hidden, _ = self.lstm(torch.cat([query_features.reshape(batch * queries, 1, -1), empty], dim=-1), state)
        return self.head(hidden), self.head(query_hidden).reshape(batch, queries, -1)
