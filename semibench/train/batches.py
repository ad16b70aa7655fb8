"""Where a step's data comes from: :class:`BatchSource` draws the labeled batch and the method's
unlabeled batches of step (epoch, iteration) and builds their augmented views on the device.

Every choice is a function of (seed, epoch, iteration): the samples from
:class:`semibench.data.loading.BatchSchedule`, the augmentation from its own generator, and unlabeled
batch j ≥ 1 (``Method.unlabeled_batches``) from its own sample stream and generator. A run
resumed at any epoch therefore draws exactly the batches an uninterrupted run draws.
"""
from __future__ import annotations

import torch

from semibench.config import RunConfig
from semibench.data.augment import AugmentConfig, augment_labeled, make_views
from semibench.data.loading import BatchSchedule, TrainData, derive_seed, make_generator
from semibench.method import Batch
from semibench.train.execution import to_device

STREAM_AUG = 13  # augmentation generators (see data.STREAM_*)
STREAM_MORE_UNLABELED = 14  # seeds of the sample streams of unlabeled batches 1..n-1


class BatchSource:
    def __init__(self, cfg: RunConfig, data: TrainData, method_cls: type, aug: AugmentConfig,
                 device: torch.device, iterations_per_epoch: int):
        t = cfg.train
        self.seed, self.data, self.aug, self.device = cfg.seed, data, aug, device
        self.views = method_cls.unlabeled_views  # the view kind, None: labeled data only
        self.view_options = dict(method_cls.view_options)
        self.n_unlabeled_batches = method_cls.unlabeled_batches if self.views is not None else 0
        self.images_per_step = t.batch_labeled + self.n_unlabeled_batches * t.batch_unlabeled
        self.schedule = BatchSchedule(len(data.labeled), len(data.unlabeled), t.batch_labeled,
                                      t.batch_unlabeled, cfg.seed, iterations_per_epoch)
        # unlabeled batches 1..n-1: each its own sample stream (only its unlabeled part is read)
        self.more_schedules = [
            BatchSchedule(len(data.labeled), len(data.unlabeled), t.batch_labeled, t.batch_unlabeled,
                          derive_seed(cfg.seed, STREAM_MORE_UNLABELED, j), iterations_per_epoch)
            for j in range(1, max(1, self.n_unlabeled_batches))]

    def batch(self, epoch: int, it: int) -> Batch:
        """The batch of step ``it`` of ``epoch`` (both 0-based)."""
        dev, d = self.device, self.data
        gen = make_generator(self.seed, STREAM_AUG, epoch, it)
        idx = self.schedule.labeled(epoch, it)
        x, y = augment_labeled(to_device(d.labeled.images[idx], dev), to_device(d.labeled.masks[idx], dev),
                               gen, self.aug)
        unlabeled, more = {}, []
        if self.views is not None:
            u = to_device(d.unlabeled.images[self.schedule.unlabeled(epoch, it)], dev)
            unlabeled = make_views(self.views, u, gen, self.aug, **self.view_options)
            for j, schedule in enumerate(self.more_schedules, start=1):
                u = to_device(d.unlabeled.images[schedule.unlabeled(epoch, it)], dev)
                gen_j = make_generator(self.seed, STREAM_AUG, epoch, it, j)
                more.append(make_views(self.views, u, gen_j, self.aug, **self.view_options))
        return Batch(labeled_image=x, labeled_mask=y, unlabeled=unlabeled, more_unlabeled=more)
