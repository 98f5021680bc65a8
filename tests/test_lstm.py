"""The recurrent meta-learner: labels arrive one step late, accuracy by presentation index, and it learns to learn."""
import torch
from torch import nn

from maml_cli.algorithms.lstm import RecurrentMetaLearner, accuracy_by_presentation, previous_labels, presentation_index
from maml_cli.loop import functional_forward
from maml_cli.tasks import Episode, classification_objective, regression_objective


def learner_and_network(protocol="sequence", presentations=4, way=3, features=5, hidden=16):
    torch.manual_seed(0)
    learner = RecurrentMetaLearner(protocol=protocol, presentations=presentations, hidden_size=hidden, embedding="raw")
    network = learner.make_network(nn.Identity(), features, features, label_size=way, out_features=way)
    return learner, network


def sequence_episode(way=3, presentations=4, features=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way).repeat(presentations)[torch.randperm(way * presentations, generator=g)]
    x = torch.randn(way * presentations, features, generator=g)
    return Episode(x, labels, x[:0], labels[:0])


def test_previous_labels_shifts_by_one_step_and_starts_with_zeros():
    channel = torch.eye(3)[[2, 0, 1, 1]]
    shifted = previous_labels(channel)
    assert torch.equal(shifted[0], torch.zeros(3))
    assert torch.equal(shifted[1:], channel[:-1])


def test_the_output_at_step_t_never_depends_on_the_label_of_step_t():
    # Change the label of step t: outputs up to and including t must not move (no leak of the current
    # label), and the output at t+1 must (the label does arrive, one step late).
    learner, network = learner_and_network()
    forward, params = functional_forward(network), dict(network.named_parameters())
    episode = sequence_episode()
    outputs, _ = learner.predictions(forward, params, episode)
    for t in (0, 5, 10):
        changed_y = episode.support_y.clone()
        changed_y[t] = (changed_y[t] + 1) % 3
        changed, _ = learner.predictions(forward, params, Episode(episode.support_x, changed_y, episode.query_x, episode.query_y))
        torch.testing.assert_close(changed[: t + 1], outputs[: t + 1], rtol=0, atol=0)
        assert not torch.allclose(changed[t + 1], outputs[t + 1])


def test_support_query_scores_each_query_from_the_support_state_alone():
    learner, network = learner_and_network(protocol="support_query")
    forward, params = functional_forward(network), dict(network.named_parameters())
    g = torch.Generator().manual_seed(3)
    support = sequence_episode(presentations=2)
    query_x, query_y = torch.randn(6, 5, generator=g), torch.arange(3).repeat(2)
    outputs, targets = learner.predictions(forward, params, Episode(support.support_x, support.support_y, query_x, query_y))
    assert outputs.shape == (6, 3) and torch.equal(targets, query_y)
    # Another query image, or other query labels, change nothing for the first query.
    other_x = query_x.clone()
    other_x[1:] = torch.randn(5, 5, generator=g)
    again, _ = learner.predictions(forward, params, Episode(support.support_x, support.support_y, other_x, query_y.flip(0)))
    torch.testing.assert_close(again[0], outputs[0], rtol=0, atol=0)
    # But the support labels matter.
    relabelled, _ = learner.predictions(forward, params, Episode(support.support_x, (support.support_y + 1) % 3, query_x, query_y))
    assert not torch.allclose(relabelled, outputs)


def test_presentation_index_and_accuracy_on_a_hand_made_sequence():
    labels = torch.tensor([1, 0, 1, 1, 0, 2])
    assert presentation_index(labels).tolist() == [1, 1, 2, 3, 2, 1]
    predicted = torch.tensor([0, 0, 1, 2, 0, 2])  # right at steps 1, 2, 4, 5
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    accuracy = accuracy_by_presentation(logits, labels, presentations=3)
    # 1st instances: steps 0 (wrong), 1 (right), 5 (right); 2nd: steps 2 (right), 4 (right); 3rd: step 3 (wrong).
    assert {k: round(v.item(), 4) for k, v in accuracy.items()} == {
        "accuracy_instance_01": 0.6667, "accuracy_instance_02": 1.0, "accuracy_instance_03": 0.0}


def test_a_short_meta_training_run_learns_within_the_sequence():
    # Each episode: 3 of 8 one-hot class patterns with freshly permuted labels, each shown 4 times with
    # noise. Only learning within the sequence can beat chance (1/3). (Measured: with 6 patterns, hidden
    # size 64 and 15,000 updates, this kind of learner reaches 100% from the 2nd instance on.)
    way, presentations, features = 3, 4, 8
    learner, network = learner_and_network(presentations=presentations, way=way, features=features, hidden=32)
    forward, params = functional_forward(network), dict(network.named_parameters())
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def toy_episode():
        prototypes = torch.eye(features)[torch.randperm(features, generator=g)[:way]]
        labels = torch.arange(way).repeat(presentations)[torch.randperm(way * presentations, generator=g)]
        x = prototypes[labels] + 0.05 * torch.randn(len(labels), features, generator=g)
        return Episode(x, labels, x[:0], labels[:0])

    for _ in range(400):
        optimizer.zero_grad()
        loss = sum(learner.meta_loss(forward, params, toy_episode(), classification_objective)[0] for _ in range(8)) / 8
        loss.backward()
        optimizer.step()
    scores = [learner.evaluate(forward, params, toy_episode(), classification_objective)[0] for _ in range(200)]
    accuracy = sum(s["accuracy"] for s in scores) / len(scores)
    # Without reading the labels fed to it, no model beats 1/3 on freshly permuted labels.
    assert accuracy > 0.45, accuracy


def test_regression_feeds_the_previous_target_value():
    torch.manual_seed(0)
    learner = RecurrentMetaLearner(protocol="sequence", hidden_size=8, embedding="raw")
    network = learner.make_network(nn.Identity(), 1, 1, label_size=1, out_features=1)
    forward, params = functional_forward(network), dict(network.named_parameters())
    x = torch.linspace(-1, 1, 6)[:, None]
    y = torch.sin(x)
    outputs, _ = learner.predictions(forward, params, Episode(x, y, x[:0], y[:0]))
    changed_y = y.clone()
    changed_y[2] += 1.0
    changed, _ = learner.predictions(forward, params, Episode(x, changed_y, x[:0], y[:0]))
    torch.testing.assert_close(changed[:3], outputs[:3], rtol=0, atol=0)
    assert not torch.allclose(changed[3], outputs[3])
    loss, metrics = learner.meta_loss(forward, params, Episode(x, y, x[:0], y[:0]), regression_objective)
    assert loss.ndim == 0 and "mse" in metrics


def test_with_conv4_an_earlier_step_never_sees_a_later_image_and_queries_stay_apart():
    # The whole sequence is embedded in one batch, so conv4 must normalise each image on its own
    # (model.batch_norm=example, the default for algo=lstm on Omniglot); batch statistics would mix steps.
    from maml_cli.models import Conv4

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for protocol in ("sequence", "support_query"):
        learner = RecurrentMetaLearner(protocol=protocol, presentations=2, hidden_size=8)
        backbone = Conv4(1, 0, hidden=4, image_size=16, batch_norm="example")
        network = learner.make_network(backbone, backbone.embedding_size, 256, label_size=3, out_features=3)
        forward, params = functional_forward(network), dict(network.named_parameters())
        x, y = torch.rand(6, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
        query_x, query_y = torch.rand(3, 1, 16, 16, generator=g), torch.tensor([2, 0, 1])
        outputs, _ = learner.predictions(forward, params, Episode(x, y, query_x, query_y))
        later_x, other_query_x = x.clone(), query_x.clone()
        later_x[-1] = torch.rand(1, 16, 16, generator=g)
        other_query_x[1:] = torch.rand(2, 1, 16, 16, generator=g)
        if protocol == "sequence":
            changed, _ = learner.predictions(forward, params, Episode(later_x, y, query_x, query_y))
            torch.testing.assert_close(changed[:-1], outputs[:-1], rtol=0, atol=0)
        else:
            changed, _ = learner.predictions(forward, params, Episode(x, y, other_query_x, query_y))
            torch.testing.assert_close(changed[0], outputs[0], rtol=0, atol=0)
        assert not torch.allclose(changed, outputs)
