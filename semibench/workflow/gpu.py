"""GPU slots: one GPU per training/evaluation job on a multi-GPU machine.

Snakemake's ``resources: gpu=1`` only counts GPUs, it does not say which one a job gets. Each job
therefore takes a free id itself: an exclusive ``fcntl.flock`` on one lock file per GPU
(``<lock dir>/gpu<id>.lock``), held through an open file descriptor for the life of the process.
The kernel drops the lock when the process ends, however it ends (SIGKILL included), so a crashed
job never leaves a GPU reserved. The chosen id goes into ``CUDA_VISIBLE_DEVICES`` before CUDA
initialises; the job then sees it as ``cuda:0``.

A big GPU is mostly idle under one job of the paper's batch (8 + 8): ``SEMIBENCH_JOBS_PER_GPU=k``
gives each GPU k slots (lock files ``gpu<id>.lock``, ``gpu<id>.1.lock`` …), filled across GPUs
first; run Snakemake with ``--resources gpu=<GPUs × k>`` then.

Under SLURM the scheduler already assigned the GPU(s): nothing is locked.
Without GPUs nothing happens and the job runs on the CPU.

Environment:
- ``SEMIBENCH_NUM_GPUS``: the number of GPUs (overrides detection; ``0`` disables slots);
- ``SEMIBENCH_JOBS_PER_GPU``: slots per GPU (default 1);
- ``SEMIBENCH_GPU_LOCK_DIR``: the lock directory (default ``<tmp>/semibench-gpu-locks``, shared
  by all users of the machine, so that their jobs do not collide either).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from semibench.errors import SemibenchError


class GpuSlotError(SemibenchError):
    """No GPU slot could be taken (all busy without waiting, timeout, unusable lock directory)."""


def lock_dir() -> Path:
    return Path(os.environ.get("SEMIBENCH_GPU_LOCK_DIR")
                or Path(tempfile.gettempdir()) / "semibench-gpu-locks")


def _env_int(name: str, minimum: int) -> int | None:
    """The integer in environment variable ``name`` (None when unset), at least ``minimum``."""
    env = os.environ.get(name)
    if env is None:
        return None
    try:
        n = int(env)
    except ValueError:
        raise GpuSlotError(f"{name} must be an integer, got {env!r}") from None
    if n < minimum:
        raise GpuSlotError(f"{name} must be >= {minimum}, got {n}")
    return n


def _count_gpus() -> int:
    """Number of GPUs without initialising CUDA in this process (CUDA_VISIBLE_DEVICES must still
    be settable afterwards)."""
    n = _env_int("SEMIBENCH_NUM_GPUS", 0)
    if n is not None:
        return n
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0:
                return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            pass
    # No nvidia-smi (e.g. a container without the tools): one device node per visible GPU.
    # torch.cuda.device_count() is avoided: its fallback initialises the driver in this process.
    return sum(1 for p in Path("/dev").glob("nvidia*") if p.name[len("nvidia"):].isdigit())


def candidate_ids() -> list[str]:
    """The GPU ids this process may take: those in CUDA_VISIBLE_DEVICES when it is set (ids or
    UUIDs), else 0..N-1 for the N GPUs of the machine."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        # CUDA stops at the first invalid entry (e.g. "-1" hides every GPU)
        valid = []
        for v in ids:
            if v.startswith("-"):
                break
            valid.append(v)
        return valid
    return [str(i) for i in range(_count_gpus())]


def jobs_per_gpu() -> int:
    k = _env_int("SEMIBENCH_JOBS_PER_GPU", 1)
    return 1 if k is None else k


def slot_files(ids: list[str], per_gpu: int) -> list[tuple[str, str]]:
    """(gpu id, lock file name) of every slot, in the order they are tried: each GPU's first
    slot, then each GPU's second, … so jobs spread over the GPUs before they share one."""
    return [(g, f"gpu{g}.lock" if k == 0 else f"gpu{g}.{k}.lock") for k in range(per_gpu) for g in ids]


def under_slurm() -> bool:
    """True when SLURM assigned this job its GPUs (then it owns them: no lock needed)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and bool(
        os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("SLURM_JOB_GPUS")
        or os.environ.get("SLURM_STEP_GPUS"))


@dataclass
class GpuSlot:
    """A held GPU slot; the lock lasts as long as ``fd`` stays open (or until ``release``)."""

    gpu_id: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "GpuSlot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise GpuSlotError(f"cannot open GPU lock file {path}: {e.strerror}; "
                           "set SEMIBENCH_GPU_LOCK_DIR to a writable directory") from None
    try:  # let other users lock the same file (umask may have removed write bits)
        os.fchmod(fd, 0o666)
    except OSError:
        pass
    return fd


def _try_lock(path: Path) -> int | None:
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # who holds it, for people looking at the lock directory
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _ensure_dir(d: Path) -> None:
    try:
        created = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        if created:
            os.chmod(d, 0o1777)  # shared by all users, like /tmp
    except OSError as e:
        raise GpuSlotError(f"cannot create the GPU lock directory {d}: {e.strerror}; "
                           "set SEMIBENCH_GPU_LOCK_DIR to a writable directory") from None


def acquire(ids: list[str] | None = None, wait: bool = True, timeout: float | None = None,
            poll: float = 0.5, directory: Path | None = None) -> GpuSlot | None:
    """Lock the first free slot of the GPUs ``ids`` (default :func:`candidate_ids`; see :func:`slot_files`).

    Returns None when there is no GPU. When all are busy: wait (polling) until one is free, or
    raise :class:`GpuSlotError` at once (``wait=False``) or after ``timeout`` seconds.
    """
    ids = candidate_ids() if ids is None else ids
    if not ids:
        return None
    slots = slot_files(ids, jobs_per_gpu())
    d = directory or lock_dir()
    _ensure_dir(d)
    start = time.monotonic()
    told = False
    while True:
        for gpu_id, name in slots:
            path = d / name
            fd = _try_lock(path)
            if fd is not None:
                return GpuSlot(gpu_id=gpu_id, path=path, fd=fd)
        waited = time.monotonic() - start
        if not wait or (timeout is not None and waited >= timeout):
            raise GpuSlotError(f"all {len(slots)} GPU slot(s) are busy (locks in {d})"
                               + (f" after waiting {waited:.0f}s" if wait else ""))
        if not told:
            print(f"semibench: all {len(slots)} GPU slot(s) busy, waiting for one (locks in {d})",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(poll)


def bind(slot: GpuSlot) -> None:
    """Make ``slot``'s GPU the only one CUDA sees in this process and its children."""
    if "CUDA_VISIBLE_DEVICES" not in os.environ:  # ids we counted: number them as nvidia-smi does
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu_id


def claim_for(device: str, wait: bool = True, timeout: float | None = None) -> GpuSlot | None:
    """Take and bind a GPU slot for a job running on ``device`` (auto | cpu | cuda | cuda:N).

    Nothing is locked for ``cpu``, for an explicit ``cuda:N`` (the user chose), under SLURM, or
    when the machine has no GPU. Call before anything initialises CUDA; keep the returned slot
    referenced for the job's life.
    """
    if device not in ("auto", "cuda") or under_slurm():
        return None
    slot = acquire(wait=wait, timeout=timeout)
    if slot is not None:
        bind(slot)
    return slot


def run_in_slot(cmd: list[str], wait: bool = True, timeout: float | None = None) -> None:
    """Replace this process by ``cmd`` holding a GPU slot (the lock descriptor is inherited, so
    the lock lives exactly as long as ``cmd``)."""
    if not cmd:
        raise GpuSlotError("no command given: semibench gpu-slot -- CMD [ARG ...]")
    slot = None if under_slurm() else acquire(wait=wait, timeout=timeout)
    if slot is not None:
        bind(slot)
        os.set_inheritable(slot.fd, True)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        raise GpuSlotError(f"cannot run {cmd[0]!r}: {e.strerror}") from None
