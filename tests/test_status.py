"""`semibench status` on a hand-built results tree: one run in each state, the epochs reached,
the ETA against a hand computation, the JSON schema and the plain text."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from semibench import cli
from semibench.config import deep_merge, load_workflow_config
from semibench.workflow.status import (
    HOST_FILE,
    STATES,
    command_run_dir,
    grid_status,
    live_run_dirs,
    log_error,
    read_jsonl,
    write_host_file,
)

# 4 epochs of 10 iterations; suponly/fullsup draw 4 images per step (labeled only), meanteacher
# 4 + 2 (one unlabeled batch)
TRAIN = {"epochs": 4, "batch_labeled": 4, "batch_unlabeled": 2, "iters_per_epoch": 10}
CONFIG = {
    "grid": {"datasets": ["synthetic"], "methods": ["suponly", "meanteacher"], "ratios": [8],
             "fullsup": True, "seeds": [0, 1]},
    "ablation": {"datasets": ["synthetic", "dsb2018"], "methods": ["cdcl"], "ratios": [8],
                 "seeds": [0]},
    "train": {"epochs": 4},
}
ROOT = Path(__file__).resolve().parent.parent
FULL_CONFIG = deep_merge(load_workflow_config([ROOT / "config" / "config.yaml"]), CONFIG)  # as the CLI
ERROR = "RuntimeError: CUDA error: out of memory"


def train_line(epoch, iteration, img_per_s):
    return {"event": "train", "epoch": epoch, "iteration": iteration, "lr": 1e-3,
            "losses": {"loss": 0.5}, "img_per_s": img_per_s, "peak_mem_mb": 10.0}


def epoch_line(epoch, val_s, train_s=1.0):
    return {"event": "epoch", "epoch": epoch, "iteration": (epoch + 1) * 10, "lr": 1e-3,
            "losses": {"loss": 0.5}, "val_dice": 0.5, "best_epoch": 0, "best_val_dice": 0.5,
            "img_per_s": 40.0, "train_s": train_s, "val_s": val_s, "peak_mem_mb": 10.0}


def write_run(root: Path, rel: str, now: float, age_s: float, lines=(), files=(), done=None,
              cut_line=False) -> Path:
    d = root / "results" / "runs" / rel
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": TRAIN}))
    if lines:
        text = "".join(json.dumps(r) + "\n" for r in lines)
        if cut_line:
            text += '{"event": "train", "epo'  # cut by a kill
        (d / "train.jsonl").write_text(text)
    for name in files:
        (d / name).write_bytes(b"")
    if done is not None:
        (d / "train_done.json").write_text(json.dumps(done))
    for p in d.iterdir():
        os.utime(p, (now - age_s, now - age_s))
    return d


def write_log(root: Path, rule: str, rel: str, text: str, mtime: float) -> Path:
    log = root / "logs" / rule / f"{rel}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    os.utime(log, (mtime, mtime))
    return log


@pytest.fixture
def tree(tmp_path):
    now = time.time()
    write_run(tmp_path, "synthetic/suponly/r8/seed0", now, 7200, files=["checkpoint.pt", "best.pt"],
              lines=[train_line(e, (e + 1) * 10, 40.0) for e in range(4)],
              done={"epochs": 4, "iterations_per_epoch": 10, "timings": {"total_s": 120.0}})
    (tmp_path / "results/runs/synthetic/suponly/r8/seed0/metrics.json").write_text("{}")
    # running on another host of a shared file system: written a minute ago, in epoch 2 (two
    # epochs finished), at iteration 25
    run = write_run(tmp_path, "synthetic/suponly/r8/seed1", now, 60, files=["checkpoint.pt", "best.pt"],
                    lines=[train_line(0, 3, 1000.0), train_line(0, 5, 40.0), train_line(0, 10, 40.0),
                           epoch_line(0, val_s=2.0), train_line(1, 15, 20.0), train_line(1, 20, 30.0),
                           epoch_line(1, val_s=4.0), train_line(2, 25, 50.0)])
    (run / HOST_FILE).write_text(json.dumps({"host": "node7", "pid": 99}))
    # interrupted an hour ago in epoch 2 (the cut epoch is replayed on resume)
    write_run(tmp_path, "synthetic/meanteacher/r8/seed0", now, 3600, files=["checkpoint.pt"],
              lines=[train_line(0, 10, 60.0), epoch_line(0, val_s=1.0), train_line(1, 20, 30.0),
                     epoch_line(1, val_s=3.0), train_line(2, 25, 30.0)], cut_line=True)
    # failed after its first epoch; the log (written after the run's files) ends in a traceback
    write_run(tmp_path, "synthetic/meanteacher/r8/seed1", now, 3500, files=["checkpoint.pt"],
              lines=[train_line(0, 10, 30.0), epoch_line(0, val_s=1.0)])
    write_log(tmp_path, "train", "synthetic/meanteacher/r8/seed1",
              "meanteacher synthetic 1/8 seed1 epoch 2/4:  50%|#####     | 5/10\r"
              "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              f"    raise RuntimeError(...)\n{ERROR}\n", now - 3000)
    write_run(tmp_path, "synthetic/fullsup/r1/seed0", now, 1800,
              files=["checkpoint.pt", "best.pt"], lines=[epoch_line(3, val_s=1.0)],
              done={"epochs": 4, "iterations_per_epoch": 10, "timings": {"total_s": 90.0}})
    # synthetic/fullsup/r1/seed1, synthetic/cdcl/r8/seed0 and dsb2018/cdcl/r8/seed0: missing
    return tmp_path, now


def by_dir(report):
    return {r["dir"].split("runs/", 1)[1]: r for r in report["runs"]}


# the hand computation: remaining iterations × images per step / img/s (mean of the last 5 train
# lines) + remaining epochs × mean validation seconds
RUNNING_LEFT = (40 - 25) * 4 / ((40 + 40 + 20 + 30 + 50) / 5) + (4 - 2) * (2.0 + 4.0) / 2
RUNNING_TOTAL = 40 * 4 / 36 + 4 * 3.0
INTERRUPTED_LEFT = (40 - 2 * 10) * 6 / ((60 + 30 + 30) / 3) + (4 - 2) * (1.0 + 3.0) / 2
INTERRUPTED_TOTAL = 40 * 6 / 40 + 4 * 2.0
FAILED_LEFT = (40 - 10) * 6 / 30 + (4 - 1) * 1.0
FAILED_TOTAL = 40 * 6 / 30 + 4 * 1.0
FULLSUP_LEFT = 90.0  # the finished fullsup run's total_s (same dataset and method)
DATASET_LEFT = (120.0 + RUNNING_TOTAL + INTERRUPTED_TOTAL + FAILED_TOTAL + 90.0) / 5  # same dataset
GRID_LEFT = RUNNING_LEFT + INTERRUPTED_LEFT + FAILED_LEFT + FULLSUP_LEFT + DATASET_LEFT


def test_each_state_epochs_and_eta(tree):
    root, now = tree
    report = grid_status(FULL_CONFIG, root / "results/runs", root / "logs", jobs=2, now=now,
                         proc_root=root / "noproc")
    runs = by_dir(report)
    assert list(runs) == [  # the grid's order (semibench.workflow.grid)
        "synthetic/suponly/r8/seed0", "synthetic/suponly/r8/seed1",
        "synthetic/meanteacher/r8/seed0", "synthetic/meanteacher/r8/seed1",
        "synthetic/fullsup/r1/seed0", "synthetic/fullsup/r1/seed1",
        "synthetic/cdcl/r8/seed0", "dsb2018/cdcl/r8/seed0"]
    states = {k: r["state"] for k, r in runs.items()}
    assert states == {
        "synthetic/suponly/r8/seed0": "done", "synthetic/suponly/r8/seed1": "running",
        "synthetic/meanteacher/r8/seed0": "interrupted", "synthetic/meanteacher/r8/seed1": "failed",
        "synthetic/fullsup/r1/seed0": "trained", "synthetic/fullsup/r1/seed1": "missing",
        "synthetic/cdcl/r8/seed0": "missing", "dsb2018/cdcl/r8/seed0": "missing"}
    assert report["counts"] == {"done": 1, "trained": 1, "running": 1, "interrupted": 1,
                                "failed": 1, "missing": 3}
    assert sum(report["counts"].values()) == report["total"] == 8

    reached = {k: (r["epochs_done"], r["epochs"]) for k, r in runs.items()}
    assert reached == {
        "synthetic/suponly/r8/seed0": (4, 4), "synthetic/suponly/r8/seed1": (2, 4),
        "synthetic/meanteacher/r8/seed0": (2, 4), "synthetic/meanteacher/r8/seed1": (1, 4),
        "synthetic/fullsup/r1/seed0": (4, 4), "synthetic/fullsup/r1/seed1": (0, 4),
        "synthetic/cdcl/r8/seed0": (0, 4), "dsb2018/cdcl/r8/seed0": (0, 4)}

    running = runs["synthetic/suponly/r8/seed1"]
    assert running["running"] == {"via": "train.jsonl", "age_s": pytest.approx(60, abs=0.1),
                                  "host": "node7"}
    failed = runs["synthetic/meanteacher/r8/seed1"]
    assert failed["error"] == {"line": ERROR, "log": str(
        root / "logs/train/synthetic/meanteacher/r8/seed1.log")}
    assert all(r["error"] is None for k, r in runs.items() if r["state"] != "failed")

    left = {k: (r["remaining_s"], r["basis"]) for k, r in runs.items()}
    assert left["synthetic/suponly/r8/seed0"] == (0.0, "finished")
    assert left["synthetic/fullsup/r1/seed0"] == (0.0, "finished")
    assert left["synthetic/suponly/r8/seed1"] == (pytest.approx(RUNNING_LEFT), "own")
    assert RUNNING_LEFT == pytest.approx(15 * 4 / 36 + 6)  # 1.667 s of training + 2 validations
    assert left["synthetic/meanteacher/r8/seed0"] == (pytest.approx(INTERRUPTED_LEFT), "own")
    assert INTERRUPTED_LEFT == pytest.approx(7.0)
    assert left["synthetic/meanteacher/r8/seed1"] == (pytest.approx(FAILED_LEFT), "own")
    assert left["synthetic/fullsup/r1/seed1"] == (pytest.approx(FULLSUP_LEFT), "dataset+method")
    assert left["synthetic/cdcl/r8/seed0"] == (pytest.approx(DATASET_LEFT), "dataset")
    assert left["dsb2018/cdcl/r8/seed0"] == (None, None)  # no dsb2018 run to estimate from

    assert report["eta"] == {"remaining_s": pytest.approx(GRID_LEFT), "jobs": 2,
                             "eta_s": pytest.approx(GRID_LEFT / 2), "runs_without_estimate": 1}
    assert GRID_LEFT == pytest.approx(164.1556, abs=1e-3)


def test_json_schema(tree):
    root, now = tree
    report = grid_status(FULL_CONFIG, root / "results/runs", root / "logs", now=now,
                         proc_root=root / "noproc")
    assert json.loads(json.dumps(report)) == report  # plain JSON types only
    assert set(report) == {"schema", "generated_at", "runs_dir", "logs_dir", "config_files",
                           "note", "total", "counts", "eta", "runs"}
    assert report["note"] is None  # some of the config's runs are on disk
    assert report["schema"] == "semibench.status/1"
    assert set(report["counts"]) == set(STATES)
    assert set(report["eta"]) == {"remaining_s", "jobs", "eta_s", "runs_without_estimate"}
    assert report["eta"]["eta_s"] == report["eta"]["remaining_s"]  # jobs=1
    for run in report["runs"]:
        assert set(run) == {"dataset", "method", "ratio", "seed", "dir", "state", "epochs_done",
                            "epochs", "running", "error", "remaining_s", "basis"}
        assert run["state"] in STATES
        assert isinstance(run["ratio"], int) and isinstance(run["seed"], int)
        assert run["basis"] in (None, "own", "dataset+method", "dataset", "finished")
        assert (run["remaining_s"] is None) == (run["basis"] is None)


def test_plain_text_and_cli(tree, monkeypatch, capsys):
    root, _ = tree
    (root / "my.yaml").write_text(yaml.safe_dump(CONFIG))
    monkeypatch.chdir(root)  # default --runs-dir results/runs, --logs-dir logs
    assert cli.main(["status", "--config", "my.yaml", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "8 runs: 1 done, 1 trained, 1 running, 1 interrupted, 1 failed, 3 missing"
    table = [line.split() for line in lines[2:9]]
    assert table[0] == ["state", "dataset", "method", "ratio", "seed", "epoch", "ETA", "estimate", "note"]
    assert [row[:6] for row in table[1:]] == [  # every run but the done one, in grid order
        ["running", "synthetic", "suponly", "1/8", "1", "2/4"],
        ["interrupted", "synthetic", "meanteacher", "1/8", "0", "2/4"],
        ["failed", "synthetic", "meanteacher", "1/8", "1", "1/4"],
        ["trained", "synthetic", "fullsup", "1/1", "0", "4/4"],
        ["missing", "synthetic", "fullsup", "1/1", "1", "0/4"],
        ["missing", "synthetic", "cdcl", "1/8", "0", "0/4"]]
    assert lines[9].split()[:8] == ["missing", "dsb2018", "cdcl", "1/8", "0", "0/4", "?", "none"]
    assert table[1][6:9] == ["8s", "own", "train.jsonl"]  # 7.67 s rounds to 8
    assert lines[3].endswith("train.jsonl written 1m00s ago on node7")
    assert table[3][6:8] == ["9s", "own"]
    assert lines[5].endswith(f"  logs/train/synthetic/meanteacher/r8/seed1.log: {ERROR}")
    assert table[5][6:8] == ["1m30s", "dataset+method"]
    assert table[6][6:8] == ["50s", "dataset"]
    assert lines[10] == ""  # the done run is counted, not listed
    assert lines[-1] == ("ETA for the rest of the grid: 1m22s (2m44s of training / 2 jobs; "
                         "evaluation not counted); 1 run(s) without an estimate, not counted")

    assert cli.main(["status", "--config", "my.yaml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["failed"] == 1 and report["eta"]["jobs"] == 1


@pytest.mark.parametrize("args, message", [
    (["--config-json", '{"grid": {"methods": ["nosuch"]}}'],
     "unknown method(s) 'nosuch' in config grid.methods; known: "),
    (["--config-json", '{"ablation": {"ratios": [0]}}'],
     "invalid config at ablation.ratios.0: 0 is less than the minimum of 1"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--config-json", '{"grid": {"ratios": 8}}'],
     "invalid config at grid.ratios: 8 is not of type 'array'"),  # the workflow's schema message
])
def test_bad_config_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"semibench: error: {message}")


def test_restarted_failed_run_counts_as_running(tree):
    """A live `semibench train` on the failed run's directory (found in /proc) wins over its log."""
    root, now = tree
    proc = root / "proc"
    (proc / "4242").mkdir(parents=True)
    argv = ["/venv/bin/python", "/venv/bin/semibench", "train", "--config-json", "{}", "--dataset",
            "synthetic", "--method", "meanteacher", "--ratio", "8", "--seed", "1", "--out",
            "results/runs/synthetic/meanteacher/r8/seed1"]
    (proc / "4242" / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / "4242" / "cwd").symlink_to(root)
    (proc / "self").mkdir()  # not a pid: skipped
    assert live_run_dirs(proc) == {os.path.realpath(root / "results/runs/synthetic/meanteacher/r8/seed1"): 4242}
    report = grid_status(FULL_CONFIG, root / "results/runs", root / "logs", now=now, proc_root=proc)
    run = by_dir(report)["synthetic/meanteacher/r8/seed1"]
    assert (run["state"], run["running"], run["error"]) == ("running", {"via": "process", "pid": 4242}, None)
    assert run["remaining_s"] == pytest.approx(FAILED_LEFT)


def test_stale_log_and_finished_training(tree):
    """A log older than the run's files belongs to an earlier attempt; after train_done.json only
    the evaluate log can make a run failed; a fresh train.jsonl of a trained run is not running."""
    root, now = tree
    runs = root / "results/runs"
    restarted = runs / "synthetic/meanteacher/r8/seed1"
    os.utime(restarted / "train.jsonl", (now - 100, now - 100))
    report = grid_status(FULL_CONFIG, runs, root / "logs", now=now, proc_root=root / "noproc")
    assert by_dir(report)["synthetic/meanteacher/r8/seed1"]["state"] == "interrupted"  # this host
    (restarted / HOST_FILE).write_text(json.dumps({"host": "node7", "pid": 1}))
    report = grid_status(FULL_CONFIG, runs, root / "logs", now=now, proc_root=root / "noproc")
    assert by_dir(report)["synthetic/meanteacher/r8/seed1"]["state"] == "running"  # fresh again
    report = grid_status(FULL_CONFIG, runs, root / "logs", now=now, fresh_minutes=1,
                         proc_root=root / "noproc")
    assert by_dir(report)["synthetic/meanteacher/r8/seed1"]["state"] == "interrupted"

    trained = runs / "synthetic/fullsup/r1/seed0"
    os.utime(trained / "train.jsonl", (now - 5, now - 5))
    write_log(root, "train", "synthetic/fullsup/r1/seed0", f"{ERROR}\n", now)
    report = grid_status(FULL_CONFIG, runs, root / "logs", now=now, proc_root=root / "noproc")
    assert by_dir(report)["synthetic/fullsup/r1/seed0"]["state"] == "trained"
    write_log(root, "evaluate", "synthetic/fullsup/r1/seed0",
              "semibench: error: best.pt is truncated; delete it\n", now)
    run = by_dir(grid_status(FULL_CONFIG, runs, root / "logs", now=now, proc_root=root / "noproc"))[
        "synthetic/fullsup/r1/seed0"]
    assert run["state"] == "failed"
    assert run["error"]["line"] == "semibench: error: best.pt is truncated; delete it"


def test_log_error_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("/a/b.py:3: UserWarning: weights unavailable\n  warnings.warn(note)\n"
                   "epoch 3/10: 100%|####| 20/20\n")
    assert log_error(log) is None  # warnings and progress are not errors
    log.write_text("semibench: error: unknown method 'x'\nTraceback (most recent call last):\n"
                   "  File \"y.py\", line 2\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    assert log_error(log) == "torch.OutOfMemoryError: CUDA out of memory."  # the last one
    log.write_text("KeyboardInterrupt\n")
    assert log_error(log) == "KeyboardInterrupt"
    assert log_error(tmp_path / "absent.log") is None


def test_read_jsonl_skips_a_cut_line(tree):
    root, _ = tree
    lines = read_jsonl(root / "results/runs/synthetic/meanteacher/r8/seed0/train.jsonl")
    assert [r["event"] for r in lines] == ["train", "epoch", "train", "epoch", "train"]


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "semibench", "evaluate", "--run", "r/x"], "/w/r/x"),
    (["/v/bin/semibench", "evaluate", "--run=/abs/y", "--threads", "1"], "/abs/y"),
    (["semibench", "gpu-slot", "--", "semibench", "train", "--out", "o"], "/w/o"),
    (["semibench", "train", "--dataset", "d", "--method", "m", "--ratio", "8", "--seed", "2"],
     "/w/results/runs/d/m/r8/seed2"),
    (["semibench", "report", "--out", "results"], None),
    (["python", "train.py", "--out", "o"], None),
    (["semibench"], None),
])
def test_command_run_dir(argv, expected):
    assert command_run_dir(argv, "/w") == expected


def test_killed_run_is_interrupted_however_fresh(tmp_path):
    """A `semibench train` process on a run, then SIGKILL: the run's files are seconds old, and
    this host knows no process runs it, so it is interrupted (the freshness rule is for runs
    started on other hosts)."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "results/runs/synthetic/suponly/r8/seed0"
    write_host_file(run)  # as `semibench train` does first
    (run / "config.json").write_text(json.dumps({"train": TRAIN}))
    (run / "train.jsonl").write_text(json.dumps(train_line(0, 3, 40.0)) + "\n")
    (run / "checkpoint.pt").write_bytes(b"")
    # a live process whose command line is `... semibench train --out <run>` (it sleeps instead)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "semibench",
                             "train", "--out", str(run)])
    try:
        def state():
            report = grid_status(FULL_CONFIG, tmp_path / "results/runs", tmp_path / "logs")
            return by_dir(report)["synthetic/suponly/r8/seed0"]

        assert state()["running"] == {"via": "process", "pid": proc.pid}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = state()
    assert (after["state"], after["running"]) == ("interrupted", None)
    assert time.time() - (run / "train.jsonl").stat().st_mtime < 600  # still "fresh"


def test_closed_pipe_exits_quietly(tmp_path):
    """`semibench status --json | head`: the reader closes the pipe first; no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "semibench", "status", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the report is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == ""


def test_config_matching_no_run_says_which_config_and_how(tmp_path, monkeypatch, capsys):
    """The quick start's runs on disk, a plain `semibench status` reads the paper grid."""
    import shutil

    shutil.copytree(ROOT / "config", tmp_path / "config")
    quick = deep_merge(load_workflow_config([ROOT / "config" / "config.yaml"]),
                       load_workflow_config([ROOT / "config" / "quick.yaml"]))
    from semibench.workflow.grid import all_runs
    quick_runs = all_runs(quick)
    for r in quick_runs:
        write_run(tmp_path, r.rel_dir(), time.time(), 7200, files=["checkpoint.pt"])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("186 runs: 0 done") and out[0].endswith("186 missing")
    assert out[-1] == (
        f"note: none of the 186 runs of config/config.yaml is under results/runs, which holds "
        f"{len(quick_runs)} other run(s), e.g. synthetic/cac/r8/seed0: pass the config the "
        f"workflow ran with, e.g. `semibench status --config FILE` as in `snakemake --configfile "
        f"FILE` (config/quick.yaml selects {len(quick_runs)} of them)")
    assert cli.main(["status", "--config", "config/quick.yaml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["note"] is None and report["counts"]["interrupted"] == len(quick_runs)
    assert report["config_files"] == ["config/config.yaml", "config/quick.yaml"]
