"""threads=auto: the CPUs this process may use (affinity mask, cgroup quota), not the machine's count."""
import os
import subprocess
import sys

import pytest

from maml_cli.threads import cgroup_cpu_quota, choose_threads, usable_cpus


def test_cgroup_v2_and_v1_quotas_are_read(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "v1") == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "v1") is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None


def test_a_cgroup_quota_below_the_affinity_mask_caps_the_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cpus(tmp_path)[0] == 1 and "cgroup CPU quota 0.5" in usable_cpus(tmp_path)[1]
    (tmp_path / "cpu.max").write_text(f"{100000 * 64} 100000\n")  # a quota above the mask does not raise it
    assert usable_cpus(tmp_path)[0] == len(os.sched_getaffinity(0))
    assert choose_threads("auto", tmp_path)[0] == len(os.sched_getaffinity(0))


def test_omp_num_threads_and_a_number_are_taken_as_given(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads("auto") == (3, "auto: OMP_NUM_THREADS=3")
    assert choose_threads("5")[0] == 5


def test_cpus_other_processes_keep_busy_are_left_to_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("maml_cli.threads.cgroup_cpu_quota", lambda root: None)
    monkeypatch.setattr("os.getloadavg", lambda: (2.6, 2.0, 1.0))
    threads, why = choose_threads("auto")
    assert threads == 1 and "about 3 kept busy by other processes" in why
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    assert choose_threads("auto")[0] == 1  # never fewer than one
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.1, 0.0))
    assert choose_threads("auto") == (4, "auto: 4 CPUs in this process's affinity mask")
    # A share of a bigger machine (a cluster job's mask): the machine-wide load average says nothing about it.
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.getloadavg", lambda: (40.0, 40.0, 40.0))
    assert choose_threads("auto")[0] == 4


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to restrict the mask to fewer")
def test_auto_honours_a_restricted_affinity_mask():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from maml_cli.threads import choose_threads; print(choose_threads('auto')[0])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
