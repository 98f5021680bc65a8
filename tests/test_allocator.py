"""keep_freed_memory: glibc's malloc keeps freed memory for the next step instead of returning it to the OS."""
import logging
import platform
import subprocess
import sys

import pytest

from conftest import run_in_process
from maml_cli import threads

GLIBC = platform.libc_ver()[0] == "glibc"

# Allocates and frees a 64 MiB tensor (above glibc's largest mmap threshold) five times, before and after
# keep_freed_memory(), and prints the page faults of the last four allocations of each: what a training step that
# allocates large activations pays in system time at every step.
FAULTS = """
import ctypes, resource, torch
from maml_cli.allocator import keep_freed_memory

ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the host's transparent huge pages

def faults_of_reallocating():
    torch.ones(16 * 2**20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(16 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_reallocating()
applied = keep_freed_memory()
print(default, applied, faults_of_reallocating())
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
def test_freed_blocks_are_reused_without_faulting_their_pages_in_again():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, timeout=120).stdout.split()
    default, applied, kept = int(out[0]), out[1] == "True", int(out[2])
    pages = 4 * 64 * 2**20 // 4096
    assert applied
    assert default > pages / 2  # as glibc comes: each 64 MiB block is mapped afresh and faulted in page by page
    assert kept < pages / 20  # kept: the heap's pages are reused


def test_maml_train_and_maml_eval_keep_freed_memory_unless_told_not_to(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(threads, "keep_freed_memory", lambda: calls.append(1) or True)
    tiny = ["dataset=sinusoid", "iterations=2", "meta_batch_size=2", "val_every=2", "val_tasks=2", "test_tasks=2", "progress=false"]
    (tmp_path / "told").mkdir()
    (tmp_path / "default").mkdir()
    told = run_in_process("maml-train", [*tiny, "keep_freed_memory=false"], cwd=tmp_path / "told")
    assert calls == [] and "glibc asked" not in told.stdout + told.stderr
    run = run_in_process("maml-train", tiny, cwd=tmp_path / "default")
    assert calls == [1] and "; glibc asked to keep freed memory for reuse (keep_freed_memory=true)" in run.stdout + run.stderr
    checkpoint = next((tmp_path / "default").glob("outputs/runs/*/last.pt"))
    run_in_process("maml-eval", [f"checkpoint={checkpoint}", "test_tasks=2", "keep_freed_memory=false"], cwd=tmp_path)
    assert calls == [1]
    run_in_process("maml-eval", [f"checkpoint={checkpoint}", "test_tasks=2"], cwd=tmp_path)
    assert calls == [1, 1]
    # Resuming with the other setting is a choice about this machine, not a change to the run's results.
    resumed = run_in_process("maml-train", [f"resume={checkpoint.parent}", "iterations=3", "keep_freed_memory=false"], cwd=tmp_path / "default")
    assert resumed.returncode == 0 and calls == [1, 1]


def test_the_log_says_whether_glibc_was_asked(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="maml_cli"):
        threads.set_up_cpu("1", keep_memory=True)
        assert caplog.messages[-1].endswith("; glibc asked to keep freed memory for reuse (keep_freed_memory=true)")
        monkeypatch.setattr(threads, "keep_freed_memory", lambda: False)  # not glibc: nothing to say
        threads.set_up_cpu("1", keep_memory=True)
        assert caplog.messages[-1] == "computing on 1 CPU thread (threads=1)"
