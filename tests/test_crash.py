"""What an interrupted job leaves behind, as Snakemake leaves it: the rerun completes with every
declared output present and correct, and a damaged checkpoint stops it with one line."""
from __future__ import annotations

import hashlib

import pytest
import torch

from semibench.errors import TrainingError
from semibench.testing import toy_config
from semibench.train.engine import Trainer, train
from tests.toy import Killed, assert_same_runs, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scripted_val(monkeypatch):
    """Validation scores 0.5, 0.9, 0.3 for epochs 0, 1, 2: the best epoch (1) lies before a kill
    after epoch 1, so the resumed epoch 2 never writes best.pt itself."""
    def validate(self):
        calls = getattr(self, "_val_calls", 0)
        self._val_calls = calls + 1
        return (0.5, 0.9, 0.3, 0.2)[self.checkpoints.start_epoch + calls]

    monkeypatch.setattr(Trainer, "validate", validate)


def _kill_after(k):
    def hook(epoch):
        if epoch == k:
            raise Killed
    return hook


def _snapshot(run_dir):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.iterdir())}


def test_rerun_after_snakemake_deleted_best_pt_restores_it(toy_root, tmp_path, local_methods, scripted_val):  # noqa: F811
    cfg = toy_config(toy_root, "_test_mt", epochs=3, unsup_start_epoch=1)
    train(cfg, tmp_path / "whole")
    assert load_state(tmp_path / "whole" / "best.pt")["epoch"] == 1

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        train(cfg, killed, on_epoch_end=_kill_after(1))
    (killed / "best.pt").unlink()  # what Snakemake does to an incomplete job's outputs
    train(cfg, killed)
    assert (killed / "train_done.json").exists()
    assert_same_runs(tmp_path / "whole", killed)


def test_best_pt_lost_after_the_run_finished_is_rederived(toy_root, tmp_path, local_methods):  # noqa: F811
    cfg = toy_config(toy_root, "_test_sup", ratio=4, epochs=2)
    run = train(cfg, tmp_path / "run")
    good = load_state(run / "best.pt")
    (run / "best.pt").write_bytes(b"garbage")
    train(cfg, run)
    again = load_state(run / "best.pt")
    assert again["epoch"] == good["epoch"]
    assert all(torch.equal(good["model"][k], again["model"][k]) for k in good["model"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_checkpoint_is_one_line_and_changes_nothing(damage, toy_root, tmp_path, local_methods):  # noqa: F811
    cfg = toy_config(toy_root, "_test_mt", epochs=3, unsup_start_epoch=1)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, run, on_epoch_end=_kill_after(0))
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\0" * 1000)
    else:
        torch.save({"epoch": 0}, ckpt)
    before = _snapshot(run)

    with pytest.raises(TrainingError) as err:
        train(cfg, run)
    message = str(err.value)
    assert "\n" not in message and str(ckpt) in message and "delete it" in message
    assert _snapshot(run) == before  # nothing written, nothing trained over
