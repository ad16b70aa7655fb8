"""GPU slots: concurrent processes get distinct GPU ids from the flock, a fifth waits or is told,
and a killed holder's slot is free again (the kernel drops its lock)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semibench.workflow import gpu

# a holder: takes a slot through the CLI verb, prints the id it was given, then sleeps
HOLDER = [sys.executable, "-m", "semibench", "gpu-slot", "--no-wait", "--",
          sys.executable, "-c",
          "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(60)"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SLURM_JOB_ID", "SLURM_JOB_GPUS",
                "SLURM_STEP_GPUS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "4")
    monkeypatch.setenv("SEMIBENCH_GPU_LOCK_DIR", str(tmp_path / "locks"))
    return dict(os.environ)


def _start_holder(env) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(HOLDER, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    assert line, p.stderr.read()
    return p, line


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_concurrent_holders_get_distinct_ids_and_a_fifth_is_told(env):
    procs = []
    try:
        ids = []
        for _ in range(4):
            p, gpu_id = _start_holder(env)
            procs.append(p)
            ids.append(gpu_id)
        assert sorted(ids) == ["0", "1", "2", "3"]
        fifth = subprocess.run(HOLDER, env=env, capture_output=True, text=True, timeout=60)
        assert fifth.returncode == 2
        assert fifth.stderr.strip().splitlines() == [
            f"semibench: error: all 4 GPU slot(s) are busy (locks in {env['SEMIBENCH_GPU_LOCK_DIR']})"]
    finally:
        _stop(procs)


def test_killed_holder_releases_its_slot_to_a_waiting_job(env):
    procs = []
    try:
        holders = [_start_holder(env) for _ in range(4)]
        procs += [p for p, _ in holders]
        victim, victim_id = holders[2]
        # a waiting fifth job (no --no-wait): it must block, then get exactly the victim's id
        waiting_cmd = [c for c in HOLDER if c != "--no-wait"]
        waiting = subprocess.Popen(waiting_cmd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        procs.append(waiting)
        assert "waiting" in waiting.stderr.readline()
        assert waiting.poll() is None
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert waiting.stdout.readline().strip() == victim_id
    finally:
        _stop(procs)


def test_slot_in_process_sets_visible_devices_and_release_frees_it(env, monkeypatch):
    slot = gpu.claim_for("auto")
    try:
        assert slot is not None and slot.gpu_id == "0"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        # the lock file names its holder
        assert Path(slot.path).read_text().split()[0] == str(os.getpid())
        # a second claim (its own open file description, as in another process) sees 0 busy
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        other = gpu.acquire(wait=False)
        assert other.gpu_id == "1"
        other.release()
    finally:
        slot.release()
    again = gpu.acquire(wait=False)
    assert again.gpu_id == "0"
    again.release()


def test_timeout_when_all_busy(env):
    held = [gpu.acquire(wait=False) for _ in range(4)]
    try:
        t0 = time.monotonic()
        with pytest.raises(gpu.GpuSlotError, match="busy .* after waiting"):
            gpu.acquire(timeout=0.3, poll=0.05)
        assert time.monotonic() - t0 >= 0.3
    finally:
        for s in held:
            s.release()


def test_no_gpu_cpu_device_slurm_and_explicit_device_lock_nothing(env, monkeypatch):
    assert gpu.claim_for("cpu") is None
    assert gpu.claim_for("cuda:1") is None
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "0")
    assert gpu.claim_for("auto") is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert gpu.claim_for("cuda") is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"  # what SLURM assigned stays


def test_candidates_follow_a_given_cuda_visible_devices(env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert gpu.candidate_ids() == ["5", "7"]
    first = gpu.acquire(wait=False)
    second = gpu.acquire(wait=False)
    try:
        assert (first.gpu_id, second.gpu_id) == ("5", "7")
        with pytest.raises(gpu.GpuSlotError, match="all 2 GPU slot"):
            gpu.acquire(wait=False)
    finally:
        first.release()
        second.release()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu.candidate_ids() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.candidate_ids() == []


def test_bad_gpu_count(env, monkeypatch):
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "four")
    with pytest.raises(gpu.GpuSlotError, match="SEMIBENCH_NUM_GPUS must be an integer"):
        gpu.candidate_ids()


def test_jobs_per_gpu_spread_over_gpus_before_sharing(env, monkeypatch):
    monkeypatch.setenv("SEMIBENCH_JOBS_PER_GPU", "2")
    assert gpu.slot_files(["0", "1"], 2) == [("0", "gpu0.lock"), ("1", "gpu1.lock"),
                                             ("0", "gpu0.1.lock"), ("1", "gpu1.1.lock")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    held = [gpu.acquire(wait=False) for _ in range(4)]
    try:
        assert [s.gpu_id for s in held] == ["0", "1", "0", "1"]
        assert len({s.path for s in held}) == 4
        with pytest.raises(gpu.GpuSlotError, match=r"all 4 GPU slot\(s\) are busy"):
            gpu.acquire(wait=False)
        held[2].release()  # GPU 0's second slot frees; the next job shares GPU 0
        again = gpu.acquire(wait=False)
        assert (again.gpu_id, again.path.name) == ("0", "gpu0.1.lock")
        again.release()
    finally:
        for s in held:
            s.release()
    for bad, msg in [("two", "must be an integer"), ("0", "must be >= 1")]:
        monkeypatch.setenv("SEMIBENCH_JOBS_PER_GPU", bad)
        with pytest.raises(gpu.GpuSlotError, match=f"SEMIBENCH_JOBS_PER_GPU {msg}"):
            gpu.acquire(wait=False)
