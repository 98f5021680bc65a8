"""The N-way K-shot sampler: distinct classes and images, labels, determinism, impossible requests; the objectives that score episodes."""
import pytest
import torch

from maml_cli.data.episodes import ClassImageSampler
from maml_cli.data.sinusoid import SinusoidTasks
from maml_cli.errors import EpisodeError
from maml_cli.tasks import classification_objective, regression_objective


def labelled_images(n_classes=12, per_class=20):
    """Image (c, i) is filled with the value c * per_class + i, so every image says who it is."""
    ids = torch.arange(n_classes * per_class).reshape(n_classes, per_class)
    return ids[:, :, None, None, None].expand(-1, -1, 1, 2, 2).to(torch.int32), ids


def identities(x, scale):
    return (x[:, 0, 0, 0] * scale).round().long()


def test_episode_has_distinct_classes_and_images_and_labels_0_to_way_minus_1():
    images, _ = labelled_images(n_classes=12, per_class=20)
    # Store the identity in uint8 range by sampling from a small table: 12 * 20 = 240 < 256.
    sampler = ClassImageSampler(images.to(torch.uint8), way=5, shot=3, query=4, where="test split")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        episode = sampler.sample(generator)
        assert episode.support_x.shape == (15, 1, 2, 2) and episode.query_x.shape == (20, 1, 2, 2)
        support_ids, query_ids = identities(episode.support_x, 255), identities(episode.query_x, 255)
        all_ids = torch.cat([support_ids, query_ids])
        assert len(set(all_ids.tolist())) == 5 * (3 + 4), "images repeat within an episode"
        classes = all_ids // 20
        assert len(set(classes.tolist())) == 5, "classes repeat within an episode"
        assert sorted(set(episode.support_y.tolist())) == list(range(5))
        assert torch.equal(episode.support_y.bincount(), torch.full((5,), 3))
        assert torch.equal(episode.query_y.bincount(), torch.full((5,), 4))
        # One label per class, the same in support and query.
        for label in range(5):
            assert set((support_ids[episode.support_y == label] // 20).tolist()) == set((query_ids[episode.query_y == label] // 20).tolist())


def test_labels_are_permuted_per_episode():
    images, _ = labelled_images()
    sampler = ClassImageSampler(images.to(torch.uint8), way=5, shot=1, query=1, where="test split")
    generator = torch.Generator().manual_seed(0)
    class_of_label0 = set()
    for _ in range(30):
        episode = sampler.sample(generator)
        class_of_label0.add(int(identities(episode.support_x[episode.support_y == 0], 255)[0]) // 20)
    assert len(class_of_label0) > 3


def test_support_and_query_come_in_shuffled_order():
    # A sequence learner (algo=lstm) must not be able to read the labels off the order.
    images, _ = labelled_images()
    sampler = ClassImageSampler(images.to(torch.uint8), way=5, shot=3, query=3, where="test split")
    generator = torch.Generator().manual_seed(0)
    orders = [sampler.sample(generator) for _ in range(20)]
    blocked = torch.arange(5).repeat_interleave(3)
    assert sum(torch.equal(e.support_y, blocked) for e in orders) == 0
    assert len({tuple(e.support_y.tolist()) for e in orders}) == 20 and len({tuple(e.query_y.tolist()) for e in orders}) == 20


def test_sequence_episodes_may_have_no_query_set():
    images, _ = labelled_images()
    episode = ClassImageSampler(images.to(torch.uint8), way=5, shot=10, query=0, where="test split").sample(torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (50, 1, 2, 2) and episode.query_x.shape == (0, 1, 2, 2)


def test_same_seed_same_episodes_different_seed_different_episodes():
    images, _ = labelled_images()
    sampler = ClassImageSampler(images.to(torch.uint8), way=5, shot=1, query=2, where="test split")

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sampler.sample(g) for _ in range(5)]

    a, b, c = draw(7), draw(7), draw(8)
    assert all(torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x) for x, y in zip(a, b))
    assert not all(torch.equal(x.support_x, y.support_x) for x, y in zip(a, c))


@pytest.mark.parametrize("way,shot,query,message", [
    (13, 1, 1, "way=13 needs 13 distinct classes per episode, but the meta-test split has only 12 classes"),
    (5, 15, 6, "shot + query = 15 + 6 = 21 distinct images per class, but each class of the meta-test split has only 20 images"),
    (5, 0, 1, "way and shot must be at least 1 and query at least 0"),
    (1, 1, 1, "way=1 in the meta-test split: a classification task needs at least 2 classes"),
])
def test_impossible_episode_raises_naming_the_numbers(way, shot, query, message):
    images, _ = labelled_images()
    with pytest.raises(EpisodeError, match=message.replace("+", r"\+")):
        ClassImageSampler(images.to(torch.uint8), way, shot, query, where="meta-test split")


def test_sinusoid_tasks_follow_the_distribution_and_reject_way():
    tasks = SinusoidTasks()
    sampler = tasks.sampler("train", way=1, shot=5, query=7)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        episode = sampler.sample(generator)
        x = torch.cat([episode.support_x, episode.query_x])
        y = torch.cat([episode.support_y, episode.query_y])
        assert episode.support_x.shape == (5, 1) and episode.query_x.shape == (7, 1)
        assert x.min() >= -5 and x.max() <= 5 and y.abs().max() <= 5
    with pytest.raises(EpisodeError, match="way must be 1"):
        tasks.sampler("train", way=5, shot=5, query=5)


@pytest.mark.parametrize("objective, targets", [
    (classification_objective, lambda g: torch.randint(0, 5, (3, 7), generator=g)),
    (regression_objective, lambda g: torch.randn(3, 7, 1, generator=g, dtype=torch.float64)),
])
def test_an_objective_scores_one_episode_as_its_row_of_a_stack_and_gives_the_loss_alone_when_asked(objective, targets):
    # One episode takes the loss's own mean (one kernel fewer on a GPU); it must equal that episode's entry in a stack.
    g = torch.Generator().manual_seed(0)
    y = targets(g)
    predictions = torch.randn(3, 7, 5 if objective is classification_objective else 1, generator=g, dtype=torch.float64)
    stacked_loss, stacked_metrics = objective(predictions, y)
    assert stacked_loss.shape == (3,) and all(m.shape == (3,) for m in stacked_metrics.values())
    for i in range(3):
        loss, metrics = objective(predictions[i], y[i])
        torch.testing.assert_close(loss, stacked_loss[i], rtol=1e-14, atol=0)
        assert metrics.keys() == stacked_metrics.keys()
        for name, value in metrics.items():
            torch.testing.assert_close(value, stacked_metrics[name][i], rtol=1e-14, atol=0)
        loss_alone, none = objective(predictions[i], y[i], metrics=False)
        assert none == {} and torch.equal(loss_alone, loss)
