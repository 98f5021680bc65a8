"""Small pieces of the command line: devices, resume hints, run names, start-up."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maml_cli.build import resolve_device
from maml_cli.config import run_name_suffix
from maml_cli.errors import UserError
from maml_cli.train import resume_override


def test_device_auto_and_cpu_and_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="not one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(UserError, match="device=cuda was asked for, but this machine has no usable CUDA device"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range():
    with pytest.raises(UserError, match="there are only"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_run_names_say_what_differs_and_need_no_quoting():
    assert run_name_suffix("") == ""
    assert run_name_suffix("experiment=maml_omniglot_5w1s,way=20") == "_experiment-maml_omniglot_5w1s_way-20"
    assert run_name_suffix("dataset.split_dir=/a b/c") == "_dataset.split_dir-a-b-c"


def test_resume_hint_quotes_multirun_member_paths_for_hydra():
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for run_dir in (Path("outputs/runs/2026-01-01_00-00-00_way-20"), Path("outputs/multirun/2026-01-01/inner_steps=3,way=5")):
        (as_typed,) = shlex.split(resume_override(run_dir))  # what the shell hands to maml-train
        assert parser.parse_override(as_typed).value() == str(run_dir)


def test_maml_eval_lists_its_own_keys_and_refuses_to_change_the_dataset():
    from maml_cli.evaluate import parse_args
    with pytest.raises(UserError) as unknown:
        parse_args(["checkpoint=x", "foo=1"])
    assert "Keys: batch_tasks, checkpoint, data_root, dataset, device," in str(unknown.value) and "experiment" not in str(unknown.value)
    with pytest.raises(UserError, match="unknown key datset. Did you mean dataset"):
        parse_args(["checkpoint=x", "datset=1"])
    with pytest.raises(UserError, match="dataset= cannot change it"):
        parse_args(["checkpoint=x", "dataset=omniglot"])
    assert parse_args(["checkpoint=x", "dataset.split_dir=/moved"]).dataset.split_dir == "/moved"


def test_the_commands_and_omniglot_start_without_importing_torchvision(small_omniglot):
    # torchvision's import takes seconds (through its models it loads torch's compiler), which every command, and
    # every bad-input message, would wait for; only an Omniglot download uses it.
    code = ("import sys; import maml_cli.train, maml_cli.evaluate, maml_cli.results; "
            "from maml_cli.data.omniglot import OmniglotTasks; "
            f"OmniglotTasks({str(small_omniglot)!r}, val_characters=4, test_characters=8, download=True, check_counts=False); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
