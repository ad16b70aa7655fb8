"""Model selection: :class:`Validator` scores a method's networks on the val split after each
epoch, with the code that scores the test set (:class:`semibench.evaluate.score.EvalSet`: resize and
argmax on the device, the val inputs loaded once and kept there), so the selected epoch is the
best one in the table's convention."""
from __future__ import annotations

from pathlib import Path

import torch

from semibench.config import RunConfig
from semibench.data.loading import SampleCache, TrainData
from semibench.data.prepared import PreparedDataset
from semibench.evaluate.metrics import Counts, per_image_mean
from semibench.train.execution import Execution

MODEL_SELECTION = "val per-image mean dice at the original size (Trainer.validate)"


class Validator:
    def __init__(self, cfg: RunConfig, data: TrainData, device: torch.device, execution: Execution):
        self.cfg, self.data, self.device, self.execution = cfg, data, device, execution
        self.eval_set = None  # built at the first validation

    def _samples(self):
        if self.data.val_samples:
            return SampleCache(self.data.val_samples)
        return PreparedDataset(Path(self.cfg.data_dir) / "prepared" / self.cfg.dataset)

    @torch.no_grad()
    def dice(self, net: torch.nn.Module) -> float:
        """The per-image mean Dice of ``net`` over the val samples at their original size."""
        from semibench.evaluate.score import EvalSet
        if self.eval_set is None:
            source = self._samples()
            self.eval_set = EvalSet([source.load(i) for i in self.data.val.ids], self.cfg.train.input_size,
                                    self.cfg.train.eval_batch_size, self.device, pad=self.execution.compile)
        rows = self.eval_set.counts(net, self.execution.autocast())
        return per_image_mean([Counts(r["tp"], r["fp"], r["tn"], r["fn"]) for r in rows])["dice"]

    @torch.no_grad()
    def score(self, method) -> tuple[float, dict[str, float]]:
        """The selection score (``inference_model()``'s Dice) and ``{"val_dice/<name>": Dice}`` of
        ``extra_validation_models()`` (logged, not selected on); the method's mode is restored."""
        model = method.inference_model()
        was_training = method.training
        score = self.dice(model)
        extra = {f"val_dice/{name}": score if net is model else self.dice(net)
                 for name, net in method.extra_validation_models().items()}
        method.train(was_training)
        return score, extra
