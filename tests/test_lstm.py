"""The recurrent meta-learner: what each step may see, batched episodes equal one-at-a-time, and it learns to learn."""
import pytest
import torch

from maml_cli.algorithms.lstm import RecurrentMetaLearner, accuracy_by_presentation, previous_labels, presentation_index
from maml_cli.loop import accumulate_meta_gradient, evaluate, functional_forward
from maml_cli.models import Conv4, Identity
from maml_cli.tasks import CLASSIFICATION, Episode, EpisodeBatch, classification_objective, regression_objective


def learner_and_network(protocol="sequence", presentations=4, way=3, features=5, hidden=16, dtype=torch.float32):
    torch.manual_seed(0)
    learner = RecurrentMetaLearner(protocol=protocol, presentations=presentations, hidden_size=hidden, embedding="raw")
    network = learner.make_network(Identity(features), features, label_size=way, out_features=way).to(dtype)
    return learner, network


def sequence_episode(way=3, presentations=4, features=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way).repeat(presentations)[torch.randperm(way * presentations, generator=g)]
    x = torch.randn(way * presentations, features, generator=g, dtype=dtype)
    return Episode(x, labels, x[:0], labels[:0])


def support_query_episode(way=3, shot=2, query=2, features=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(way).repeat(shot)[torch.randperm(way * shot, generator=g)]
    query_y = torch.arange(way).repeat(query)[torch.randperm(way * query, generator=g)]
    return Episode(torch.randn(way * shot, features, generator=g, dtype=dtype), support_y,
                   torch.randn(way * query, features, generator=g, dtype=dtype), query_y)


def outputs_of(learner, network, episode):
    outputs, _ = learner.predictions(functional_forward(network), dict(network.named_parameters()), EpisodeBatch.stack([episode]))
    return outputs[0]


def test_previous_labels_shifts_by_one_step_and_starts_with_zeros():
    channel = torch.eye(3)[[2, 0, 1, 1]]
    for batched in (channel, torch.stack([channel, channel.flip(0)])):
        shifted = previous_labels(batched)
        assert torch.equal(shifted[..., 0, :], torch.zeros_like(shifted[..., 0, :]))
        assert torch.equal(shifted[..., 1:, :], batched[..., :-1, :])


def test_sequence_step_t_sees_neither_its_own_label_nor_a_later_image():
    # Change the label of step t: outputs up to and including t must not move (no leak of the current
    # label), and the output at t+1 must (the label does arrive, one step late). Change the image of
    # step t: outputs before t must not move.
    learner, network = learner_and_network()
    episode = sequence_episode()
    outputs = outputs_of(learner, network, episode)
    for t in (0, 5, 10):
        changed_y = episode.support_y.clone()
        changed_y[t] = (changed_y[t] + 1) % 3
        changed = outputs_of(learner, network, Episode(episode.support_x, changed_y, episode.query_x, episode.query_y))
        torch.testing.assert_close(changed[: t + 1], outputs[: t + 1], rtol=0, atol=0)
        assert not torch.allclose(changed[t + 1], outputs[t + 1])
        changed_x = episode.support_x.clone()
        changed_x[t] += 1.0
        changed = outputs_of(learner, network, Episode(changed_x, episode.support_y, episode.query_x, episode.query_y))
        torch.testing.assert_close(changed[:t], outputs[:t], rtol=0, atol=0)
        # Centred on the mean of the steps so far, the first step is zero whatever its image; its image
        # still reaches the next step through that mean.
        assert not torch.allclose(changed[t if t else 1], outputs[t if t else 1])


def test_support_query_reads_labelled_support_and_scores_each_query_from_the_support_state_alone():
    learner, network = learner_and_network(protocol="support_query")
    episode = support_query_episode(query=3)
    outputs = outputs_of(learner, network, episode)
    assert outputs.shape == (9, 3)
    # Another query image, or other query labels, change nothing for the first query.
    other_x = episode.query_x.clone()
    other_x[1:] = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))
    again = outputs_of(learner, network, Episode(episode.support_x, episode.support_y, other_x, episode.query_y.flip(0)))
    torch.testing.assert_close(again[0], outputs[0], rtol=0, atol=0)
    # The label of the last support step reaches the queries: a support step carries its own label (in
    # the sequence protocol it would arrive one step too late to matter).
    relabelled_y = episode.support_y.clone()
    relabelled_y[-1] = (relabelled_y[-1] + 1) % 3
    relabelled = outputs_of(learner, network, Episode(episode.support_x, relabelled_y, episode.query_x, episode.query_y))
    assert not torch.allclose(relabelled, outputs)


def test_support_steps_carry_their_own_label_and_queries_an_empty_channel():
    learner, network = learner_and_network(protocol="support_query")
    episode = support_query_episode()
    seen = []
    network.lstm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0][..., -3:].clone()))
    outputs_of(learner, network, episode)
    support_channel, query_channel = seen
    # The hot entry defaults to the square root of the embedding's width (5 here).
    torch.testing.assert_close(support_channel[0], torch.nn.functional.one_hot(episode.support_y, 3).float() * 5 ** 0.5)
    assert torch.equal(query_channel, torch.zeros_like(query_channel)) and query_channel.shape == (6, 1, 3)


def test_presentation_index_and_accuracy_on_a_hand_made_sequence():
    labels = torch.tensor([1, 0, 1, 1, 0, 2])
    assert presentation_index(labels).tolist() == [1, 1, 2, 3, 2, 1]
    predicted = torch.tensor([0, 0, 1, 2, 0, 2])  # right at steps 1, 2, 4, 5
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    accuracy = accuracy_by_presentation(logits, labels, presentations=3)
    # 1st instances: steps 0 (wrong), 1 (right), 5 (right); 2nd: steps 2 (right), 4 (right); 3rd: step 3 (wrong).
    assert {k: round(v.item(), 4) for k, v in accuracy.items()} == {
        "accuracy_instance_01": 0.6667, "accuracy_instance_02": 1.0, "accuracy_instance_03": 0.0}
    # Per episode when stacked: the second episode is right everywhere.
    stacked = accuracy_by_presentation(torch.stack([logits, torch.nn.functional.one_hot(labels, 3).float()]), torch.stack([labels, labels]), 3)
    assert stacked["accuracy_instance_03"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("protocol", ["sequence", "support_query"])
def test_a_meta_batch_in_one_pass_equals_one_episode_at_a_time_in_float64(protocol):
    # Per-episode losses and metrics, the meta-gradient, and evaluation in chunks: the batched path must be
    # the same mathematics as running each episode alone.
    learner, network = learner_and_network(protocol=protocol, dtype=torch.float64)
    make = sequence_episode if protocol == "sequence" else support_query_episode
    episodes = [make(seed=s, dtype=torch.float64) for s in range(5)]
    forward, params = functional_forward(network), dict(network.named_parameters())
    losses, metrics = learner.meta_loss(forward, params, EpisodeBatch.stack(episodes), classification_objective)
    assert losses.shape == (5,)
    for i, episode in enumerate(episodes):
        alone_loss, alone_metrics = learner.meta_loss(forward, params, EpisodeBatch.stack([episode]), classification_objective)
        torch.testing.assert_close(losses[i], alone_loss[0], rtol=1e-12, atol=1e-14)
        for name, value in alone_metrics.items():
            torch.testing.assert_close(metrics[name][i], value[0], rtol=1e-12, atol=1e-14)

    def meta_gradient(per_call):
        network.zero_grad(set_to_none=True)
        learner.episodes_per_call = per_call
        means = accumulate_meta_gradient(learner, network, episodes, classification_objective)
        return torch.cat([p.grad.flatten() for p in network.parameters()]), means

    batched, batched_means = meta_gradient(None)
    alone, alone_means = meta_gradient(1)
    assert batched.norm() > 0
    torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-14)
    assert batched_means == pytest.approx(alone_means, rel=1e-12)

    class Episodes:
        def sample(self, generator):
            return make(seed=int(torch.randint(1000, (1,), generator=generator)), dtype=torch.float64)

    learner.episodes_per_call = None
    chunked = evaluate(learner, network, Episodes(), CLASSIFICATION, 7, 0, torch.device("cpu"))
    learner.episodes_per_call = 1
    one_by_one = evaluate(learner, network, Episodes(), CLASSIFICATION, 7, 0, torch.device("cpu"))
    assert chunked[0].keys() == one_by_one[0].keys()
    for name in chunked[0]:
        assert chunked[0][name] == pytest.approx(one_by_one[0][name], rel=1e-12)


def toy_classification(features, way, presentations, g):
    """3 of ``features`` one-hot patterns with noise, labels permuted afresh: only learning within the episode beats chance."""
    prototypes = torch.eye(features)[torch.randperm(features, generator=g)[:way]]
    labels = torch.arange(way).repeat(presentations)[torch.randperm(way * presentations, generator=g)]
    return prototypes, labels, prototypes[labels] + 0.05 * torch.randn(len(labels), features, generator=g)


@pytest.mark.parametrize("protocol", ["sequence", "support_query"])
def test_a_short_meta_training_run_learns_within_the_episode(protocol):
    # Each episode: 3 of 8 one-hot class patterns with freshly permuted labels. Without reading the labels
    # fed to it, no model beats 1/3.
    way, presentations, features = 3, 4, 8
    learner, network = learner_and_network(protocol=protocol, presentations=presentations, way=way, features=features, hidden=32)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def toy_episode():
        prototypes, labels, x = toy_classification(features, way, presentations, g)
        if protocol == "sequence":
            return Episode(x, labels, x[:0], labels[:0])
        query_y = torch.randperm(way, generator=g)
        return Episode(x[:way * 2], labels[:way * 2], prototypes[query_y] + 0.05 * torch.randn(way, features, generator=g), query_y)

    def usable(episode):  # support_query: every class must be in the support set
        return protocol == "sequence" or len(set(episode.support_y.tolist())) == way

    def draw(n):
        episodes = []
        while len(episodes) < n:
            episode = toy_episode()
            if usable(episode):
                episodes.append(episode)
        return episodes

    for _ in range(400):
        optimizer.zero_grad()
        accumulate_meta_gradient(learner, network, draw(8), classification_objective)
        optimizer.step()
    (metrics,) = learner.evaluate(functional_forward(network), dict(network.named_parameters()), EpisodeBatch.stack(draw(200)),
                                  classification_objective).values()
    assert metrics["accuracy"].mean() > 0.45, metrics["accuracy"].mean()


def test_regression_feeds_the_previous_target_value_in_sequence_and_the_own_value_in_support():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 6)[:, None]
    y = torch.sin(x)
    changed_y = y.clone()
    changed_y[2] += 1.0
    learner = RecurrentMetaLearner(protocol="sequence", hidden_size=8, embedding="raw", centre=False)
    network = learner.make_network(Identity(1), 1, label_size=1, out_features=1)
    outputs = outputs_of(learner, network, Episode(x, y, x[:0], y[:0]))
    changed = outputs_of(learner, network, Episode(x, changed_y, x[:0], y[:0]))
    torch.testing.assert_close(changed[:3], outputs[:3], rtol=0, atol=0)
    assert not torch.allclose(changed[3], outputs[3])
    losses, metrics = learner.meta_loss(functional_forward(network), dict(network.named_parameters()),
                                        EpisodeBatch.stack([Episode(x, y, x[:0], y[:0])]), regression_objective)
    assert losses.shape == (1,) and metrics["mse"].shape == (1,)
    learner.protocol = "support_query"
    queries = Episode(x[:3], y[:3], x[3:], y[3:])
    last_changed = y[:3].clone()
    last_changed[-1] += 1.0
    assert not torch.allclose(outputs_of(learner, network, queries), outputs_of(learner, network, Episode(x[:3], last_changed, x[3:], y[3:])))


def test_with_conv4_a_step_never_sees_a_later_image_and_queries_stay_apart_across_a_meta_batch():
    # A meta-batch is embedded in one call, so conv4 must normalise each image on its own (what the build
    # chooses for algo=lstm): batch statistics would mix steps, queries and episodes.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for protocol in ("sequence", "support_query"):
        learner = RecurrentMetaLearner(protocol=protocol, presentations=2, hidden_size=8)
        backbone = Conv4(1, 0, hidden=4, image_size=16, batch_norm="example")
        network = learner.make_network(backbone, 256, label_size=3, out_features=3)
        forward, params = functional_forward(network), dict(network.named_parameters())
        episodes = [Episode(torch.rand(6, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]),
                            torch.rand(3, 1, 16, 16, generator=g), torch.tensor([2, 0, 1])) for _ in range(2)]
        outputs, _ = learner.predictions(forward, params, EpisodeBatch.stack(episodes))
        changed_episodes = [Episode(e.support_x.clone(), e.support_y, e.query_x.clone(), e.query_y) for e in episodes]
        if protocol == "sequence":
            changed_episodes[1].support_x[-1] = torch.rand(1, 16, 16, generator=g)  # the second episode's last step
        else:
            changed_episodes[1].query_x[1:] = torch.rand(2, 1, 16, 16, generator=g)  # the second episode's later queries
        changed, _ = learner.predictions(forward, params, EpisodeBatch.stack(changed_episodes))
        torch.testing.assert_close(changed[0], outputs[0], rtol=0, atol=0)  # the other episode is untouched
        torch.testing.assert_close(changed[1, :-1] if protocol == "sequence" else changed[1, 0],
                                   outputs[1, :-1] if protocol == "sequence" else outputs[1, 0], rtol=0, atol=0)
        assert not torch.allclose(changed[1], outputs[1])


def test_episode_shapes_and_centring_on_by_default():
    learner = RecurrentMetaLearner(train_query=1)
    assert learner.episode_shape("train", 5, 1, 15) == (5, 1, 1)
    assert learner.episode_shape("test", 5, 1, 15) == (5, 1, 15) and learner.centre
    sequence = RecurrentMetaLearner(protocol="sequence", presentations=10)
    assert sequence.episode_shape("train", 5, 1, 15) == (5, 10, 0) and sequence.centre
    assert not RecurrentMetaLearner(protocol="sequence", centre=False).centre
    # null in a saved config keeps what it meant before sequence could centre: on for support_query only.
    assert RecurrentMetaLearner(centre=None).centre and not RecurrentMetaLearner(protocol="sequence", centre=None).centre


def test_a_one_wide_raw_input_is_not_centred_and_centring_it_is_refused():
    # Centred and brought to a fixed norm, sinusoid's 1-wide x would be only its sign.
    from maml_cli.errors import UserError
    with pytest.raises(UserError, match="needs an embedding at least 2 wide"):
        RecurrentMetaLearner(protocol="sequence", embedding="raw").make_network(Identity(1), 1, label_size=1, out_features=1)
    learner = RecurrentMetaLearner(protocol="sequence", embedding="raw", centre=False, hidden_size=8)
    network = learner.make_network(Identity(1), 1, label_size=1, out_features=1).double()
    x = torch.linspace(-5, 5, 6, dtype=torch.float64)[:, None]
    seen, _ = embeddings_read_and_outputs(learner, network, Episode(x, torch.sin(x), x[:0], x[:0]), features=1)
    torch.testing.assert_close(seen[0][0], x)


def embeddings_read_and_outputs(learner, network, episode, features=5):
    """What the LSTM reads as embeddings (one tensor per call of the LSTM), and the scored outputs."""
    seen = []
    hook = network.lstm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0][..., :features].clone()))
    outputs = outputs_of(learner, network, episode)
    hook.remove()
    return seen, outputs


def test_sequence_centring_uses_only_the_steps_so_far_and_leaves_a_fixed_norm():
    # Each step is centred on the mean embedding of its sequence up to and including it: the first step is
    # zero, every later one has norm sqrt(width), and a vector added to every input changes nothing.
    learner, network = learner_and_network(protocol="sequence", dtype=torch.float64)
    episode = sequence_episode(dtype=torch.float64)
    seen, outputs = embeddings_read_and_outputs(learner, network, episode)
    x = episode.support_x
    expected = x - x.cumsum(0) / torch.arange(1, len(x) + 1, dtype=torch.float64)[:, None]
    torch.testing.assert_close(seen[0][0, 1:], torch.nn.functional.normalize(expected[1:], dim=-1) * 5 ** 0.5)
    assert torch.equal(seen[0][0, 0], torch.zeros(5, dtype=torch.float64))
    shifted = outputs_of(learner, network, Episode(x + torch.randn(5, dtype=torch.float64), episode.support_y, x[:0], episode.query_y))
    torch.testing.assert_close(shifted, outputs)


def test_centring_is_on_the_support_set_and_leaves_a_fixed_norm():
    # CL2N on the support set: every embedding the LSTM reads has norm sqrt(width), and adding the same vector
    # to every input of the episode (a common component) changes nothing.
    learner, network = learner_and_network(protocol="support_query", dtype=torch.float64)
    episode = support_query_episode(dtype=torch.float64)
    seen, outputs = embeddings_read_and_outputs(learner, network, episode)
    for features in seen:
        torch.testing.assert_close(features.norm(dim=-1), torch.full(features.shape[:-1], 5 ** 0.5, dtype=torch.float64))
    shift = torch.randn(5, dtype=torch.float64)
    shifted = outputs_of(learner, network, Episode(episode.support_x + shift, episode.support_y, episode.query_x + shift, episode.query_y))
    torch.testing.assert_close(shifted, outputs)
