"""Prototypical Networks: hand-computed prototypes and distances, a separable task, larger training episodes."""
import pytest
import torch

from maml_cli.algorithms.protonet import ProtoNet, prototype_logits, prototypes
from maml_cli.tasks import Episode, EpisodeBatch, classification_objective


def identity_forward(params, x):
    return x


def test_logits_are_negative_squared_distances_to_hand_computed_prototypes():
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    support_y = torch.tensor([0, 0, 1, 1])
    query_x = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # Prototypes by hand: class 0 at (1, 0), class 1 at (0, 5).
    torch.testing.assert_close(prototypes(support_x, support_y, 2), torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    expected = -torch.tensor([[1.0, 1.0 + 16.0], [1.0 + 9.0, 4.0]])
    logits = ProtoNet().query_logits(identity_forward, {}, support_x, support_y, query_x)
    torch.testing.assert_close(logits, expected)


def test_support_labels_in_any_order_give_the_same_prototypes():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.arange(3).repeat(4)
    order = torch.randperm(12, generator=g)
    torch.testing.assert_close(prototypes(x, y, 3), prototypes(x[order], y[order], 3))


def test_cosine_distance_scores_by_angle():
    query = torch.tensor([[1.0, 0.0]])
    protos = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    logits = prototype_logits(query, protos, "cosine", cosine_scale=10.0)
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0]]))
    with pytest.raises(ValueError, match="not one of euclidean, cosine"):
        ProtoNet(distance="manhattan")


def test_a_separable_task_is_solved_perfectly_with_an_identity_embedding():
    g = torch.Generator().manual_seed(0)
    way, shot, query = 5, 3, 6
    centres = 10 * torch.eye(way, 8)
    support_y, query_y = torch.arange(way).repeat_interleave(shot), torch.arange(way).repeat_interleave(query)
    episode = Episode(centres[support_y] + 0.5 * torch.randn(way * shot, 8, generator=g), support_y,
                      centres[query_y] + 0.5 * torch.randn(way * query, 8, generator=g), query_y)
    scored = ProtoNet().evaluate(identity_forward, {}, EpisodeBatch.stack([episode]), classification_objective, score_every=3)
    assert list(scored) == [0] and scored[0]["accuracy"].tolist() == [1.0]  # one entry, before any step: score_every does not apply


def test_training_episodes_may_have_more_classes_than_test_episodes():
    protonet = ProtoNet(train_way=60, train_shot=1, train_query=5)
    assert protonet.episode_shape("train", 5, 1, 15) == (60, 1, 5)
    assert protonet.episode_shape("test", 5, 1, 15) == (5, 1, 15)
    assert protonet.episode_shape("val", 20, 1, 15) == (20, 1, 15)
