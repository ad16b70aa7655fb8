"""The `semibench` command: listings, the config a run receives, and one-line errors (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from semibench import cli
from semibench.config import RunConfig, TrainConfig
from semibench.registry import DATASETS, METHODS

PAPER_METHODS = {"suponly", "fullsup", "meanteacher", "cdcl"} | {f"cdcl-scheme{i}" for i in range(1, 7)}
VERBS = ("datasets", "methods", "obtain", "verify", "prepare", "split", "train", "evaluate",
         "report", "gpu-slot", "export", "predict")


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semibench", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("semibench: error: ")
    return lines[0][len("semibench: error: "):]


def test_help_for_every_verb(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as e:
            cli.main([verb, "--help"])
        assert e.value.code == 0
        assert f"usage: semibench {verb}" in capsys.readouterr().out


def test_methods_and_datasets_one_per_line():
    out = run_cli("methods")
    assert out.returncode == 0, out.stderr
    names = out.stdout.splitlines()
    assert names == METHODS.names() == sorted(names)
    assert PAPER_METHODS <= set(names)
    out = run_cli("datasets")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == DATASETS.names()
    assert {"dsb2018", "monuseg", "synthetic"} <= set(DATASETS.names())


def test_unknown_method_dataset_ratio_are_one_line_and_exit_2(capsys, tmp_path):
    base = ["train", "--dataset", "synthetic", "--method", "suponly", "--ratio", "8", "--seed", "0",
            "--out", str(tmp_path / "run")]

    def with_(flag, value):
        args = list(base)
        args[args.index(flag) + 1] = value
        return args

    assert cli.main(with_("--method", "nope")) == 2
    assert error_line(capsys) == f"unknown method 'nope'; known: {', '.join(METHODS.names())}"
    assert cli.main(with_("--dataset", "kaggle")) == 2
    assert error_line(capsys) == f"unknown dataset 'kaggle'; known: {', '.join(DATASETS.names())}"
    assert cli.main(with_("--ratio", "0")) == 2
    assert error_line(capsys) == "label ratio must be an integer k >= 1 (1/k labeled), got 0"
    assert cli.main(with_("--method", "fullsup")) == 2
    assert error_line(capsys) == "method 'fullsup' trains at ratio 1 only, not 8"
    assert cli.main(["prepare", "--dataset", "kaggle", "--data-dir", str(tmp_path)]) == 2
    assert error_line(capsys).startswith("unknown dataset 'kaggle'; known: ")
    assert not (tmp_path / "run").exists()


def test_bad_config_input(capsys, tmp_path):
    base = ["train", "--dataset", "synthetic", "--method", "suponly", "--ratio", "8", "--seed", "0"]
    assert cli.main(base + ["--config-json", "{train: 1"]) == 2
    assert error_line(capsys).startswith("--config-json is not valid JSON")
    assert cli.main(base + ["--config-json", "[1, 2]"]) == 2
    assert error_line(capsys) == "--config-json must hold a JSON object"
    assert cli.main(base + ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert error_line(capsys) == f"config file {tmp_path / 'missing.yaml'} not found"
    assert cli.main(base + ["--config-json", '{"train": {"epochz": 3}}']) == 2
    assert error_line(capsys).startswith("unknown train option(s): epochz; known: ")
    assert cli.main(["gpu-slot", "--"]) == 2
    assert error_line(capsys) == "no command given: semibench gpu-slot -- CMD [ARG ...]"


def test_errors_print_no_traceback_in_a_real_process():
    out = run_cli("train", "--dataset", "synthetic", "--method", "nope", "--ratio", "8", "--seed", "0")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.startswith("semibench: error: unknown method 'nope'")
    assert len(out.stderr.strip().splitlines()) == 1


def test_keyboard_interrupt_is_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(METHODS, "names", interrupted)
    assert cli.main(["methods"]) == 2
    assert error_line(capsys) == "interrupted"


def test_train_receives_files_then_json_merged(monkeypatch, tmp_path):
    """--config files merge in order, then --config-json; the engine gets exactly that run."""
    import semibench.train.engine

    seen = {}

    def fake_train(cfg, out_dir):
        seen["cfg"], seen["out"] = cfg, Path(out_dir)
        return Path(out_dir)

    monkeypatch.setattr(semibench.train.engine, "train", fake_train)
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "0")
    base = tmp_path / "base.yaml"
    base.write_text("data_dir: d1\ntrain: {epochs: 80, lr: 0.0001, backbone: densenet161}\n"
                    "method_params: {meanteacher: {consistency: 0.3}}\n")
    over = tmp_path / "over.yaml"
    over.write_text("data_dir: d2\ntrain: {epochs: 3}\n")
    args = ["train", "--config", str(base), "--config", str(over),
            "--config-json", json.dumps({"train": {"backbone": "tiny"}, "splits_dir": "sp",
                                         "method_params": {"meanteacher": {"rampup": 0.5}}}),
            "--dataset", "synthetic", "--method", "meanteacher", "--ratio", "16", "--seed", "3",
            "--device", "cpu"]
    assert cli.main(args) == 0
    cfg: RunConfig = seen["cfg"]
    assert cfg.train == TrainConfig(epochs=3, lr=0.0001, backbone="tiny")
    assert (cfg.data_dir, cfg.splits_dir, cfg.device) == ("d2", "sp", "cpu")
    assert (cfg.dataset, cfg.method, cfg.ratio, cfg.seed) == ("synthetic", "meanteacher", 16, 3)
    assert cfg.method_params == {"consistency": 0.3, "rampup": 0.5}  # merged, then resolved
    assert seen["out"] == Path("results/runs/synthetic/meanteacher/r16/seed3")


def test_evaluate_passes_the_device_and_takes_the_runs_default(monkeypatch, tmp_path, capsys):
    import semibench.evaluate.score

    calls = []

    def fake_evaluate(run_dir, device=None):
        calls.append((Path(run_dir), device))
        return {"pooled": {"dice": 0.5}, "per_image_mean": {"dice": 0.25}, "meta": {}}

    monkeypatch.setattr(semibench.evaluate.score, "evaluate_run", fake_evaluate)
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "0")
    assert cli.main(["evaluate", "--run", str(tmp_path)]) == 0
    assert cli.main(["evaluate", "--run", str(tmp_path), "--device", "cpu"]) == 0
    assert calls == [(tmp_path, None), (tmp_path, "cpu")]
    assert json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}") == \
        {"pooled": {"dice": 0.5}, "per_image_mean": {"dice": 0.25}}


def test_train_threads_default_to_the_config_s():
    """On the CPU a run is bit-identical only at the same thread count: a run started by hand
    takes the workflow job's threads.train unless --threads says otherwise."""
    from semibench.cli import step_threads
    cfg = {"threads": {"train": 3, "evaluate": 2}}
    assert step_threads(None, cfg, "train") == 3 and step_threads(5, cfg, "train") == 5
    assert step_threads(None, {}, "train") is None  # no config: torch's default


def test_foreign_errors_are_told_in_one_line():
    from semibench.errors import describe, first_line
    e = RuntimeError("\n  Error(s) in loading state_dict:\n\tsize mismatch for w\n")
    assert first_line(e) == "Error(s) in loading state_dict:"
    assert describe(e) == "RuntimeError: Error(s) in loading state_dict:"
    assert first_line(EOFError()) == "" and describe(EOFError()) == "EOFError"
