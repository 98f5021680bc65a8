"""N-way K-shot Q-query episodes from images grouped by class."""
from __future__ import annotations

import torch
from torch import Tensor

from maml_cli.errors import EpisodeError
from maml_cli.tasks import Episode


def check_episode_size(way: int, shot: int, query: int, n_classes: int, images_per_class: int, where: str,
                       smallest: bool = False) -> None:
    """Raise :class:`EpisodeError` naming the numbers if a split cannot supply the episode.

    ``smallest``: the classes differ in size and ``images_per_class`` is the smallest one's.
    """
    if way == 1:
        raise EpisodeError(f"way=1 in the {where}: a classification task needs at least 2 classes. Use way>=2 "
                           f"(and algo.train_way>=2 for ProtoNet).")
    if way < 1 or shot < 1 or query < 0:
        raise EpisodeError(f"way and shot must be at least 1 and query at least 0 (got way={way}, shot={shot}, query={query}).")
    if way > n_classes:
        raise EpisodeError(
            f"way={way} needs {way} distinct classes per episode, but the {where} has only {n_classes} classes. "
            f"Use way<={n_classes} or a split with more classes."
        )
    if shot + query > images_per_class:
        raise EpisodeError(
            f"shot + query = {shot} + {query} = {shot + query} distinct images per class, but "
            f"{'the smallest class' if smallest else 'each class'} of the {where} has only {images_per_class} images. "
            f"Use shot + query <= {images_per_class}."
        )


class ClassImageSampler:
    """Draws N-way K-shot Q-query episodes from a tensor of images grouped by class.

    Within an episode the ``way`` classes are distinct and so are the ``shot + query``
    images of each class. Classes are drawn in random order and labelled ``0..way-1``
    in that order, so labels are permuted afresh in every episode. The support and
    query sets come in shuffled order, so a model that reads them as a sequence
    (``algo=lstm``) cannot rely on the order. Every random choice comes from the
    generator passed to :meth:`sample`.

    Args:
        class_images: uint8 tensor ``(n_classes, images_per_class, C, H, W)``; kept on
            its device, episodes come out on the same device as float in [0, 1].
        way, shot, query: classes per episode, support and query images per class.
        where: a description of the split for error messages, e.g. ``"meta-train split of omniglot (random)"``.

    Raises:
        EpisodeError: if the split cannot supply ``way`` classes or ``shot + query`` images per class.
    """

    def __init__(self, class_images: Tensor, way: int, shot: int, query: int, where: str) -> None:
        n_classes, images_per_class = class_images.shape[:2]
        check_episode_size(way, shot, query, n_classes, images_per_class, where)
        self.class_images = class_images
        self.way, self.shot, self.query = way, shot, query

    def sample(self, generator: torch.Generator) -> Episode:
        n_classes, images_per_class = self.class_images.shape[:2]
        classes = torch.randperm(n_classes, generator=generator)[: self.way]
        picks = torch.rand(self.way, images_per_class, generator=generator).argsort(dim=1)[:, : self.shot + self.query]
        device = self.class_images.device
        images = self.class_images[classes.to(device)[:, None], picks.to(device)].float().div_(255)
        return arrange_episode(images, self.shot, generator)


def arrange_episode(images: Tensor, shot: int, generator: torch.Generator) -> Episode:
    """An episode from the drawn images ``(way, shot + query, *image)``: class ``i`` of the draw is label ``i``,
    its first ``shot`` images the support set; support and query are each shuffled with ``generator``."""
    way, k = images.shape[:2]
    query = k - shot
    device = images.device
    image_shape = images.shape[2:]
    labels = torch.arange(way, device=device)
    support_order = torch.randperm(way * shot, generator=generator).to(device)
    query_order = torch.randperm(way * query, generator=generator).to(device)
    return Episode(
        support_x=images[:, :shot].reshape(-1, *image_shape)[support_order],
        support_y=labels.repeat_interleave(shot)[support_order],
        query_x=images[:, shot:].reshape(-1, *image_shape)[query_order],
        query_y=labels.repeat_interleave(query)[query_order],
    )
