"""The MAML meta-gradient against finite differences, and first-order MAML against its definition."""
import torch
from torch import nn

from maml_cli.algorithms.maml import MAML, adapt
from maml_cli.loop import functional_forward, has_tied_tensors
from maml_cli.models import BatchStatNorm, Conv4, differentiated_twice, in_differentiated_twice
from maml_cli.tasks import Episode, EpisodeBatch, classification_objective, regression_objective


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # Smooth activations, so central differences are accurate; batch norm on batch statistics as in Conv4.
    return nn.Sequential(nn.Linear(3, 6), BatchStatNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_episode(way=3, shot=2, query=4, features=3) -> Episode:
    g = torch.Generator().manual_seed(1)
    return Episode(
        torch.randn(way * shot, features, generator=g, dtype=torch.float64), torch.arange(way).repeat_interleave(shot),
        torch.randn(way * query, features, generator=g, dtype=torch.float64), torch.arange(way).repeat_interleave(query),
    )


def meta_loss_value(model, params, episode, inner_steps, first_order=False):
    maml = MAML(inner_lr=0.5, inner_steps=inner_steps, test_inner_steps=inner_steps, first_order=first_order)
    losses, _ = maml.meta_loss(functional_forward(model), params, EpisodeBatch.stack([episode]), classification_objective)
    return losses[0]


def meta_gradient(model, episode, inner_steps, first_order=False):
    params = dict(model.named_parameters())
    loss = meta_loss_value(model, params, episode, inner_steps, first_order)
    return dict(zip(params, torch.autograd.grad(loss, tuple(params.values()))))


def finite_difference_gradient(model, episode, inner_steps, eps=1e-6):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {}
    for name, value in params.items():
        grad = torch.zeros_like(value)
        for i in range(value.numel()):
            shifted = []
            for sign in (1, -1):
                p = {k: v.clone().requires_grad_() for k, v in params.items()}
                with torch.no_grad():
                    p[name].view(-1)[i] += sign * eps
                shifted.append(meta_loss_value(model, p, episode, inner_steps).item())
            grad.view(-1)[i] = (shifted[0] - shifted[1]) / (2 * eps)
        grads[name] = grad
    return grads


def test_second_order_meta_gradient_equals_central_differences():
    model, episode = tiny_model(), tiny_episode()
    for inner_steps in (1, 2):
        analytic = meta_gradient(model, episode, inner_steps)
        numeric = finite_difference_gradient(model, episode, inner_steps)
        for name in analytic:
            torch.testing.assert_close(analytic[name], numeric[name], rtol=1e-6, atol=1e-8, msg=f"{name}, {inner_steps} steps")


def test_first_order_differs_from_second_order_and_equals_detached_inner_gradient():
    model, episode = tiny_model(), tiny_episode()
    second = meta_gradient(model, episode, 2)
    first = meta_gradient(model, episode, 2, first_order=True)
    assert max((second[k] - first[k]).abs().max().item() for k in first) > 1e-4

    # Reference: the inner gradients detached by hand, then the query loss differentiated.
    params = dict(model.named_parameters())
    forward = functional_forward(model)
    adapted = params
    for _ in range(2):
        loss, _ = classification_objective(forward(adapted, episode.support_x), episode.support_y)
        grads = torch.autograd.grad(loss, tuple(adapted.values()), create_graph=True)
        adapted = {k: p - 0.5 * g.detach() for (k, p), g in zip(adapted.items(), grads)}
    query_loss, _ = classification_objective(forward(adapted, episode.query_x), episode.query_y)
    reference = dict(zip(params, torch.autograd.grad(query_loss, tuple(params.values()))))
    for name in first:
        torch.testing.assert_close(first[name], reference[name], rtol=1e-12, atol=1e-14)


def test_conv4_meta_gradient_matches_directional_finite_difference():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, out_features=3, hidden=4, image_size=16).double()
    g = torch.Generator().manual_seed(2)
    episode = Episode(torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3),
                      torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(2))
    assert_meta_gradient_matches_directional_differences(model, episode, eps=1e-6, rtol=1e-5)


def assert_meta_gradient_matches_directional_differences(model, episode, eps, rtol, inner_steps=2, directions=3):
    """The second-order meta-gradient along random directions against central differences of the meta-loss.

    Networks of piecewise-linear parts (ReLU, max-pooling) need ``eps`` small enough for no step to cross a kink:
    the inner gradient, hence the adapted weights, jumps there."""
    params = dict(model.named_parameters())
    analytic = dict(zip(params, torch.autograd.grad(meta_loss_value(model, params, episode, inner_steps), tuple(params.values()))))
    for seed in range(directions):
        direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(seed), dtype=v.dtype) for k, v in params.items()}
        values = []
        for sign in (1, -1):
            shifted = {k: (v.detach() + sign * eps * direction[k]).requires_grad_() for k, v in params.items()}
            values.append(meta_loss_value(model, shifted, episode, inner_steps).item())
        numeric = (values[0] - values[1]) / (2 * eps)
        exact = sum((analytic[k] * direction[k]).sum() for k in params).item()
        assert abs(numeric - exact) <= rtol * max(1.0, abs(exact)), (numeric, exact)


def conv4_layouts(model, x):
    """Whether the first normalisation layer saw channels-last activations, for one forward pass."""
    seen = []
    handle = model.features[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    output = model(x)
    handle.remove()
    return output, seen[0]


def test_conv4_channels_last_is_the_same_function_and_stays_contiguous_where_differentiated_twice():
    torch.manual_seed(0)
    plain = Conv4(in_channels=1, out_features=3, hidden=4).double()
    fast = Conv4(in_channels=1, out_features=3, hidden=4, channels_last=True).double()
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    expected, plain_layout = conv4_layouts(plain, x)
    output, fast_layout = conv4_layouts(fast, x)
    assert torch.allclose(output, expected, rtol=0, atol=1e-12)
    assert fast_layout and not plain_layout
    with differentiated_twice():
        assert not conv4_layouts(fast, x)[1]
    assert conv4_layouts(fast, x)[1]  # the mark ends with the block


def test_the_mark_is_per_thread():
    import threading
    inside, checked = threading.Event(), threading.Event()
    seen_elsewhere = []

    def marked():
        with differentiated_twice():
            inside.set()
            checked.wait(timeout=10)

    thread = threading.Thread(target=marked)
    thread.start()
    inside.wait(timeout=10)
    seen_elsewhere.append(in_differentiated_twice())  # another task's mark must not change this one's layout
    checked.set()
    thread.join()
    assert seen_elsewhere == [False]


def test_second_order_inner_loop_is_marked_and_first_order_is_not():
    marks = []

    def forward(params, x):
        marks.append(in_differentiated_twice())
        return x @ params["w"]

    params = {"w": torch.randn(3, 2, dtype=torch.float64, requires_grad=True)}
    episode = tiny_episode(way=2, shot=2, query=2)
    for first_order in (False, True):
        MAML(0.1, 2, 0, first_order).meta_loss(forward, params, EpisodeBatch.stack([episode]), classification_objective)
    # Two support passes and the query pass, at second order then first order.
    assert marks == [True, True, False, False, False, False]


def test_adaptation_lowers_the_support_loss_and_leaves_the_model_untouched():
    model, episode = tiny_model(), tiny_episode()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    forward = functional_forward(model)
    params = dict(model.named_parameters())
    losses = []
    for steps in range(6):
        adapted = adapt(forward, params, episode.support_x, episode.support_y, classification_objective, 0.2, steps)
        losses.append(classification_objective(forward(adapted, episode.support_x), episode.support_y)[0].item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])


def test_evaluate_reports_every_inner_step_and_matches_adapt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.linspace(-1, 1, 10, dtype=torch.float64)[:, None]
    episode = Episode(x[:5], torch.sin(x[:5]), x[5:], torch.sin(x[5:]))
    maml = MAML(inner_lr=0.1, inner_steps=1, test_inner_steps=3)
    forward = functional_forward(model)
    params = dict(model.named_parameters())
    per_step = maml.evaluate(forward, params, EpisodeBatch.stack([episode]), regression_objective)
    assert list(per_step) == [0, 1, 2, 3]
    for steps, metrics in per_step.items():
        adapted = adapt(forward, params, episode.support_x, episode.support_y, regression_objective, 0.1, steps, first_order=True)
        expected, _ = regression_objective(forward(adapted, episode.query_x), episode.query_y)
        torch.testing.assert_close(metrics["mse"], expected.detach()[None])


def test_evaluate_predicts_the_queries_only_after_the_scored_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.linspace(-1, 1, 14, dtype=torch.float64)[:, None]
    episode = Episode(x[:5], torch.sin(x[:5]), x[5:], torch.sin(x[5:]))
    maml = MAML(inner_lr=0.1, inner_steps=1, test_inner_steps=5)
    params = dict(model.named_parameters())
    every_step = maml.evaluate(functional_forward(model), params, EpisodeBatch.stack([episode]), regression_objective)
    for score_every, kept in ((1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4, 5]), (3, [0, 3, 5]), (9, [0, 5]), (None, [5])):
        query_passes = []

        def counting_forward(weights, inputs):
            query_passes.append(len(inputs) == len(episode.query_x))  # 9 queries, 5 support examples
            return functional_forward(model)(weights, inputs)

        scored = maml.evaluate(counting_forward, params, EpisodeBatch.stack([episode]), regression_objective, score_every)
        assert list(scored) == kept
        assert sum(query_passes) == len(kept) and len(query_passes) - sum(query_passes) == 5  # every step is still taken
        for step in kept:
            torch.testing.assert_close(scored[step]["mse"], every_step[step]["mse"])


class TiedLinears(nn.Module):
    """Two layers sharing one weight tensor under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3, bias=False)
        self.second = nn.Linear(3, 3, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_functional_forward_uses_a_tied_weight_everywhere_it_is_tied():
    torch.manual_seed(0)
    model, x, weight = TiedLinears().double(), torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    assert has_tied_tensors(model)
    out = functional_forward(model)({"first.weight": weight}, x)
    torch.testing.assert_close(out, torch.tanh(x @ weight.T) @ weight.T)


def test_functional_forward_on_a_subset_of_parameters_keeps_the_model_s_own_for_the_rest():
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=8).double()
    assert not has_tied_tensors(model)  # functional_call is then spared its search for tied weights
    x = torch.randn(10, 1, 28, 28, dtype=torch.float64)
    head = {n: torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("head.")}
    body = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    forward = functional_forward(model)
    features = forward(body, x, "body")
    torch.testing.assert_close(forward(head, features, "head"), features @ head["head.weight"].T + head["head.bias"])
    torch.testing.assert_close(forward({**body, **head}, x), forward(head, features, "head"))
    torch.testing.assert_close(model(x), forward({}, x))  # the model's own parameters are left in place
