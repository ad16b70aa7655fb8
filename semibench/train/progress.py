"""One epoch's logging: :class:`EpochLog` reads the queued losses every ``LOG_EVERY`` steps and
after the epoch's last (one host synchronisation per window), writes a ``"train"`` line per
window to ``train.jsonl``, moves the progress bar, and sums the epoch's mean losses."""
from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm import tqdm

from semibench.train.rundir import RunLog, peak_memory_mb

LOG_EVERY = 25  # iterations between "train" lines in train.jsonl (and between loss reads)


class EpochLog:
    def __init__(self, log: RunLog, epoch: int, iterations_per_epoch: int, images_per_step: int,
                 device: torch.device, description: str):
        self.log, self.epoch, self.iterations_per_epoch = log, epoch, iterations_per_epoch
        self.images_per_step, self.device = images_per_step, device
        self.sums: dict[str, float] = {}
        self.window: dict[str, float] = {}
        self.n_window = 0
        self.t0 = self.t_window = time.perf_counter()
        self.bar = tqdm(total=iterations_per_epoch, desc=description, leave=False, mininterval=1.0, unit="it")

    def step_done(self, it: int, lr: float, read_losses: Callable[[], list[dict[str, float]]]) -> None:
        """After step ``it`` (0-based in the epoch): at a window's end, read and log its losses.
        The epoch's last read precedes its validation and checkpoint, so a non-finite loss stops
        the run before either."""
        self.bar.update(1)
        self.n_window += 1
        if self.n_window < LOG_EVERY and it != self.iterations_per_epoch - 1:
            return
        for values in read_losses():
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.window[k] = self.window.get(k, 0.0) + v
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t_window
        means = {k: v / self.n_window for k, v in self.window.items()}
        self.log.write(event="train", epoch=self.epoch, iteration=self.epoch * self.iterations_per_epoch + it + 1,
                       lr=lr, losses=means, img_per_s=self.n_window * self.images_per_step / max(dt, 1e-9),
                       images_per_step=self.images_per_step,  # for `semibench status` (no import)
                       peak_mem_mb=peak_memory_mb(self.device))
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
        self.window, self.n_window, self.t_window = {}, 0, time.perf_counter()

    def close(self) -> tuple[dict[str, float], float]:
        """The epoch's mean losses and its training seconds."""
        self.bar.close()
        return {k: v / self.iterations_per_epoch for k, v in self.sums.items()}, time.perf_counter() - self.t0
