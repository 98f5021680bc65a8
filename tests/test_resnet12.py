"""ResNet-12: its parts and shapes, per-example normalisation, the MAML meta-gradient through it, and its config for every algorithm."""
import pytest
import torch

from conftest import SMALL_OVERRIDES, run_dirs, run_in_process
from maml_cli.algorithms.mamlpp import norm_parameter_names
from maml_cli.build import build_algorithm, build_model, build_tasks, validate
from maml_cli.errors import UserError
from maml_cli.models import ResNet12, differentiated_twice
from maml_cli.tasks import Episode
from test_config import _instantiate_all, compose_config
from test_e2e import omniglot_args
from test_maml import assert_meta_gradient_matches_directional_differences

TINY = (4, 6, 8, 8)


def tiny_resnet(out_features=3, batch_norm="batch", **kwargs) -> ResNet12:
    torch.manual_seed(0)
    return ResNet12(in_channels=1, out_features=out_features, hidden=TINY, image_size=20, batch_norm=batch_norm, **kwargs).double()


def images(n, seed=1):
    return torch.rand(n, 1, 20, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_parts_shapes_and_embedding_size():
    net, x = tiny_resnet(), images(5)
    assert net.embedding_size == TINY[-1]
    features = net(x, "body")
    assert features.shape == (5, TINY[-1]) and net(x).shape == (5, 3)
    torch.testing.assert_close(net(features, "head"), net(x), rtol=0, atol=0)
    headless = tiny_resnet(out_features=0)
    assert isinstance(headless.head, torch.nn.Identity) and headless(x).shape == (5, TINY[-1])
    assert ResNet12(1, 5, hidden=TINY, image_size=16)(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match="image_size=15 is too small.*at least 16"):
        ResNet12(1, 5, hidden=TINY, image_size=15)
    with pytest.raises(ValueError, match="four positive filter counts"):
        ResNet12(1, 5, hidden=(4, 4, 4))


def test_example_norm_keeps_each_output_to_its_example_and_batch_norm_mixes_them():
    x = images(6)
    for batch_norm, mixes in (("example", False), ("batch", True)):
        net = tiny_resnet(batch_norm=batch_norm)
        assert net.mixes_examples == mixes
        alone, in_batch = net(x[:2]), net(x)[:2]
        if mixes:
            assert (alone - in_batch).abs().max() > 1e-6
        else:
            torch.testing.assert_close(alone, in_batch, rtol=0, atol=1e-12)


def test_channels_last_is_the_same_function_and_stays_contiguous_where_differentiated_twice():
    plain, fast = tiny_resnet(), tiny_resnet(channels_last=True)
    x, seen = images(5), []
    fast.blocks[1].norms[0].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-12)
    with differentiated_twice():
        fast(x)
    assert seen == [True, False]


@pytest.mark.parametrize("batch_norm", ["batch", "example"])
def test_second_order_maml_meta_gradient_matches_central_finite_differences(batch_norm):
    episode = Episode(images(3, seed=2), torch.arange(3), images(6, seed=3), torch.arange(3).repeat(2))
    # With LeakyReLU and max-pooling at every resolution, steps of 1e-6 cross kinks of the inner gradient here; 1e-8 do not.
    assert_meta_gradient_matches_directional_differences(tiny_resnet(batch_norm=batch_norm), episode, eps=1e-8, rtol=1e-6)


def resnet12_config(small_omniglot, *overrides):
    return compose_config(["model=resnet12", "model.hidden=[4,4,4,4]", f"data_root={small_omniglot}", *SMALL_OVERRIDES, *overrides])


@pytest.mark.parametrize("algo", ["maml", "protonet", "anil", "mamlpp"])
def test_the_resnet12_config_builds_and_takes_a_meta_step_for_each_algorithm(algo, small_omniglot):
    cfg = resnet12_config(small_omniglot, f"algo={algo}", "way=3", "query=2")
    assert cfg.model._target_ == "maml_cli.models.ResNet12"
    _instantiate_all(cfg)
    network = build_model(cfg, build_tasks(cfg), build_algorithm(cfg))
    assert isinstance(network, ResNet12) and cfg.model.batch_norm == "batch"
    assert network.embedding_size == 4 and isinstance(network.head, torch.nn.Identity if algo == "protonet" else torch.nn.Linear)
    if algo == "mamlpp":  # per-step batch norm finds every normalisation layer: 4 blocks x (3 + shortcut)
        assert len(norm_parameter_names(network)) == 4 * 4 * 2


def test_the_config_refuses_a_filter_count_below_one_and_a_wrong_number_of_blocks(small_omniglot):
    with pytest.raises(UserError, match=r"model.hidden must be at least 1 \(got \[4, 0, 4, 4\]\)"):
        validate(resnet12_config(small_omniglot, "model.hidden=[4,0,4,4]"))
    cfg = resnet12_config(small_omniglot, "model.hidden=[4,4,4]")
    with pytest.raises(UserError, match="four positive filter counts"):
        build_model(cfg, build_tasks(cfg), build_algorithm(cfg))


def test_a_two_iteration_run_trains_resnet12(tmp_path, small_omniglot):
    args = [a for a in omniglot_args(small_omniglot, 2) if not a.startswith("model.hidden=")]
    run_in_process("maml-train", [*args, "model=resnet12", "model.hidden=[4,4,4,4]"], cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    assert "ResNet12" in (run / "config.yaml").read_text() and (run / "last.pt").is_file()
