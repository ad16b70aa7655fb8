"""Resolved hyperparameters: every run records its method's complete hyperparameters (defaults
plus overrides) under ``method_params.<method>``, so editing a default in a method file changes
exactly that method's jobs in ``snakemake -n`` and a resume across the edit is refused naming
the key. Also: the removed ``train.num_workers`` key."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semibench.config import RunConfig
from semibench.errors import ConfigError, TrainingError
from semibench.method import resolved_hparams
from semibench.methods.meanteacher import MeanTeacherHparams
from semibench.registry import METHODS
from semibench.testing import toy_config
from semibench.train.engine import train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


class Killed(Exception):
    pass


def test_resolved_hparams_are_defaults_plus_overrides():
    assert resolved_hparams(METHODS.get("meanteacher"), {"consistency": 0.3}) == {"consistency": 0.3, "rampup": 1.0}
    assert resolved_hparams(METHODS.get("fullsup"), None) == {}
    with pytest.raises(ConfigError, match="unknown hyperparameter.*SupOnlyHparams: x"):
        resolved_hparams(METHODS.get("fullsup"), {"x": 1})
    no_dataclass = type("NoHp", (), {"name": "nohp", "Hparams": type(None)})
    assert resolved_hparams(no_dataclass, {}) == {}
    with pytest.raises(ConfigError, match="'nohp' takes no hyperparameters, got x"):
        resolved_hparams(no_dataclass, {"x": 1})
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        resolved_hparams(METHODS.get("cutmix"), {"gamma": 1})


def test_run_config_records_them_under_method_params_method():
    wf = {"train": {"epochs": 3}, "method_params": {"tcsmv2": {"consistency": 2.0}}}
    cfg = RunConfig.from_workflow(wf, "toy", "tcsmv2", 8, 0)
    d = cfg.to_dict()
    assert set(d["method_params"]) == {"tcsmv2"}
    assert d["method_params"]["tcsmv2"]["consistency"] == 2.0 and d["method_params"]["tcsmv2"]["rampup"] == 0.75
    items = cfg.fingerprint_items()
    assert items["method_params.tcsmv2.consistency"] == 2.0 and items["method_params.tcsmv2.ema_alpha"] == 0.999
    assert RunConfig.from_dict(d) == cfg and RunConfig.from_dict(d).resolved() == cfg  # round trip
    # a file written before (flat overrides, num_workers) still reads
    old = {**d, "method_params": {"consistency": 2.0}, "train": {**d["train"], "num_workers": 4}}
    assert RunConfig.from_dict(old).method_params == {"consistency": 2.0}


def test_removed_num_workers_is_a_clear_error():
    with pytest.raises(ConfigError, match="train.num_workers was removed .*delete that line"):
        RunConfig.from_workflow({"train": {"num_workers": 0}}, "toy", "suponly", 8, 0)
    assert "num_workers" not in (ROOT / "config" / "schema.json").read_text()
    for path in [ROOT / "config" / "config.yaml", ROOT / "config" / "quick.yaml",
                 *(ROOT / "config" / "studies").glob("*.yaml")]:
        assert "num_workers" not in path.read_text(), path


def test_files_hold_the_resolved_params_and_a_resume_across_a_default_edit_is_refused(
        toy_root, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    cfg = toy_config(toy_root, "meanteacher", epochs=2, method_params={"rampup": 0.5})

    def kill(epoch):
        raise Killed

    with pytest.raises(Killed):
        train(cfg, out, on_epoch_end=kill)
    want = {"meanteacher": {"consistency": 0.1, "rampup": 0.5}}
    assert json.loads((out / "config.json").read_text())["method_params"] == want
    # "edit the default in methods/meanteacher.py": consistency 0.1 -> 0.2
    monkeypatch.setattr(MeanTeacherHparams.__init__, "__defaults__", (0.2, 1.0))
    with pytest.raises(TrainingError, match=r"differing keys: method_params\.meanteacher\.consistency "
                                            r"\(0\.1 → 0\.2\)\."):
        train(cfg, out)
    monkeypatch.undo()
    train(cfg, out)  # the unedited default resumes
    done = json.loads((out / "train_done.json").read_text())
    assert done["config"]["method_params"] == want
    from semibench.evaluate.score import evaluate_run
    assert evaluate_run(out)["meta"]["config"]["method_params"] == want
    monkeypatch.setattr(MeanTeacherHparams.__init__, "__defaults__", (0.2, 1.0))
    with pytest.raises(TrainingError, match=r"train_done\.json was written under another config; "
                                            r"differing keys: method_params\.meanteacher\.consistency"):
        train(cfg, out)


# ---------------------------------------------------------------------------- the workflow

SMALL = """grid: {datasets: [synthetic], methods: [suponly, meanteacher, tcsmv2], ratios: [8], fullsup: false,
       seeds: [0]}
ablation: {datasets: [synthetic], methods: [suponly], ratios: [8], seeds: [0]}
"""


def _train_jobs(workdir: Path, shadow: Path) -> dict[str, dict]:
    """{run dir: its --config-json} of every train job of ``snakemake -n -p``, with the
    semibench package (and its methods) imported from ``shadow``."""
    env = dict(os.environ, PYTHONPATH=str(shadow), PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--configfile",
                          "small.yaml"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {}
    for m in re.finditer(r"semibench train --config-json '(.*?)' .*?--out (\S+)", out.stdout + out.stderr):
        jobs[m.group(2)] = json.loads(m.group(1))
    return jobs


def test_editing_a_default_changes_exactly_that_methods_jobs_in_a_dry_run(tmp_path):
    workdir, shadow = tmp_path / "wf", tmp_path / "pkg"
    workdir.mkdir()
    for name in ("Snakefile", "rules", "config", "profiles", "envs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, workdir / name)
    (workdir / "small.yaml").write_text(SMALL)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "semibench", shadow / "semibench", ignore=ignore)
    shutil.copytree(ROOT / "methods", shadow / "semibench" / "methods", ignore=ignore)
    shutil.copytree(ROOT / "datasets", shadow / "semibench" / "datasets", ignore=ignore)

    before = _train_jobs(workdir, shadow)
    assert sorted(Path(k).parts[3] for k in before) == ["meanteacher", "suponly", "tcsmv2"]
    assert before["results/runs/synthetic/tcsmv2/r8/seed0"]["method_params"]["tcsmv2"]["rampup"] == 0.75

    source = shadow / "semibench" / "methods" / "tcsmv2.py"
    text = source.read_text()
    assert text.count("    rampup: float = 0.75") == 1
    source.write_text(text.replace("    rampup: float = 0.75", "    rampup: float = 0.5"))
    after = _train_jobs(workdir, shadow)

    assert set(after) == set(before)
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["results/runs/synthetic/tcsmv2/r8/seed0"]
    params = after[changed[0]]["method_params"]["tcsmv2"]
    assert params["rampup"] == 0.5 and params["consistency"] == 1.0  # the rest as before
