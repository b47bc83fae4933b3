"""Good manners on a shared machine: the entry point makes OpenMP wait passively and sizes the
thread pool to the CPUs the process may use, before torch loads, never overriding the user."""

import os
import subprocess
import sys

import pytest

from diffcli import cli


@pytest.fixture
def env(monkeypatch):
    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    return monkeypatch


def test_passive_wait_and_threads_from_the_affinity_mask(env):
    env.setattr(os, "sched_getaffinity", lambda pid: {2, 5})
    cli.share_the_machine()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["OMP_NUM_THREADS"] == "2"


def test_threads_are_shared_among_torchrun_processes(env):
    env.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    env.setenv("LOCAL_WORLD_SIZE", "3")
    cli.share_the_machine()
    assert os.environ["OMP_NUM_THREADS"] == "2"  # 8 CPUs // 3 processes


def test_a_whole_idle_machine_keeps_torchs_default(env):
    env.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    cli.share_the_machine()
    assert "OMP_NUM_THREADS" not in os.environ


def test_the_users_settings_win(env):
    env.setattr(os, "sched_getaffinity", lambda pid: {0})
    env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env.setenv("OMP_NUM_THREADS", "6")
    cli.share_the_machine()
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["OMP_NUM_THREADS"]) == ("ACTIVE", "6")


def test_the_real_entry_point_sets_them_before_torch_loads(tmp_path):
    """`taskset`-like restriction through the affinity mask, seen by torch in a real process."""
    code = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "sys.argv = ['diffcli', '--version']\n"
        "from diffcli import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "import torch\n"
        "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "PASSIVE 1"
