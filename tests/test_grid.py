"""The run grid (semibench/workflow/grid.py): the one list the workflow and `semibench status` share."""
from __future__ import annotations

from pathlib import Path

import pytest

from semibench.config import load_workflow_config
from semibench.errors import ConfigError
from semibench.workflow.grid import Run, all_runs, section_runs

ROOT = Path(__file__).resolve().parent.parent


def test_grid_runs_in_order_and_fullsup_at_ratio_1_only():
    cfg = {"grid": {"datasets": ["dsb2018", "monuseg"], "methods": ["suponly", "cdcl"],
                    "ratios": [32, 8], "fullsup": True, "seeds": [0, 1]}}
    runs = all_runs(cfg)
    expected = [Run(d, m, k, s) for d in ("dsb2018", "monuseg") for m in ("suponly", "cdcl")
                for k in (32, 8) for s in (0, 1)]
    expected_fullsup = {d: [Run(d, "fullsup", 1, s) for s in (0, 1)] for d in ("dsb2018", "monuseg")}
    # per dataset: the listed methods, then fullsup (appended), each over ratios then seeds
    assert runs == (expected[:8] + expected_fullsup["dsb2018"]
                    + expected[8:] + expected_fullsup["monuseg"])
    assert {r.ratio for r in runs if r.method == "fullsup"} == {1}
    assert len(runs) == 2 * 2 * 2 * 2 + 2 * 2


def test_fullsup_listed_explicitly_is_not_doubled_and_ignores_the_ratios():
    cfg = {"grid": {"datasets": ["synthetic"], "methods": ["fullsup", "suponly"], "ratios": [16, 8],
                    "fullsup": True, "seeds": [3]}}
    assert all_runs(cfg) == [Run("synthetic", "fullsup", 1, 3), Run("synthetic", "suponly", 16, 3),
                             Run("synthetic", "suponly", 8, 3)]


def test_ablation_merged_after_the_grid_without_duplicates():
    cfg = {"grid": {"datasets": ["dsb2018"], "methods": ["cdcl"], "ratios": [32, 8], "seeds": [0]},
           "ablation": {"datasets": ["dsb2018"], "methods": ["cdcl", "cdcl-scheme1"],
                        "ratios": [32], "seeds": [0, 1]}}
    assert all_runs(cfg) == [
        Run("dsb2018", "cdcl", 32, 0), Run("dsb2018", "cdcl", 8, 0),  # grid
        Run("dsb2018", "cdcl", 32, 1),  # ablation: (cdcl, 32, 0) is already in the grid
        Run("dsb2018", "cdcl-scheme1", 32, 0), Run("dsb2018", "cdcl-scheme1", 32, 1)]


def test_empty_sections():
    assert section_runs({"grid": {}}, "grid") == []
    assert section_runs({}, "ablation") == []
    cfg = {"grid": {"datasets": ["synthetic"], "methods": ["cdcl"], "ratios": [8], "seeds": [0]},
           "ablation": {}}
    assert all_runs(cfg) == [Run("synthetic", "cdcl", 8, 0)]
    with pytest.raises(ConfigError, match=r"^the config selects no runs \(grid and ablation are empty\)$"):
        all_runs({"grid": {}, "ablation": None})


def test_run_dir_layout():
    assert Run("dsb2018", "cdcl", 32, 2).rel_dir() == "dsb2018/cdcl/r32/seed2"


@pytest.mark.parametrize("section, key, value, message", [
    ("grid", "methods", ["cdcl", "nosuch"],
     "unknown method(s) 'nosuch' in config grid.methods; known: cac, cct, cdcl, "),
    ("ablation", "datasets", ["mnist", "dsb2018", "cifar"],
     "unknown dataset(s) 'mnist', 'cifar' in config ablation.datasets; known: dsb2018, folder, monuseg, synthetic"),
    ("grid", "ratios", [8, 0, 64, -2],
     "label ratio(s) 0, -2 in config grid.ratios are not integers k >= 1 (k means 1/k labeled)"),
])
def test_unknown_names_give_the_workflows_one_line_errors(section, key, value, message):
    cfg = {s: {"datasets": ["dsb2018"], "methods": ["cdcl"], "ratios": [32], "seeds": [0]}
           for s in ("grid", "ablation")}
    cfg[section][key] = value
    with pytest.raises(ConfigError) as e:
        all_runs(cfg)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def _count(section: dict) -> int:
    """datasets × (methods × ratios + fullsup at one ratio) × seeds, when nothing overlaps."""
    methods = [m for m in section["methods"] if m != "fullsup"]
    fullsup = bool(section.get("fullsup")) or "fullsup" in section["methods"]
    return len(section["datasets"]) * (len(methods) * len(section["ratios"]) + fullsup) * len(section["seeds"])


@pytest.mark.parametrize("files", [["config.yaml"], ["config.yaml", "quick.yaml"]])
def test_shipped_configs(files):
    """The paper's grid (Table 1 and the Table 2 schemes) and the quick one: every run once."""
    cfg = load_workflow_config([ROOT / "config" / f for f in files])
    runs = all_runs(cfg)
    assert len(set(runs)) == len(runs)
    assert len(runs) == _count(cfg["grid"]) + _count(cfg["ablation"])  # the schemes are not in the grid
    assert {r.dataset for r in runs} == set(cfg["grid"]["datasets"]) | set(cfg["ablation"]["datasets"])


def test_extended_config_adds_fixmatch_and_unimatch_to_every_table1_cell():
    base = all_runs(load_workflow_config([ROOT / "config" / "config.yaml"]))
    ext = all_runs(load_workflow_config([ROOT / "config" / "config.yaml", ROOT / "config" / "extended.yaml"]))
    extra = [r for r in ext if r not in base]
    assert not [r for r in base if r not in ext]  # the paper's runs stay as they are
    cells = {(r.dataset, r.ratio, r.seed) for r in base if r.method == "suponly"}
    assert sorted(extra) == sorted(Run(d, m, k, s) for d, k, s in cells for m in ("fixmatch", "unimatch"))
    assert len(extra) == 2 * 2 * 3 * 3  # two methods, two datasets, three ratios, three seeds


def test_mini_benchmark_is_the_dsb_1_128_study_run_for_run():
    """config/studies/mini.yaml stands alone, but its expected results are the measured study's
    (headroom.yaml + semi-cpu-128.yaml): the same runs, each with the same resolved config."""
    from semibench.config import RunConfig

    base = [ROOT / "config" / "config.yaml"]
    mini = load_workflow_config([*base, ROOT / "config" / "studies" / "mini.yaml"])
    study = load_workflow_config([*base, *(ROOT / "config" / "studies" / f"{name}.yaml"
                                           for name in ("headroom", "semi-cpu-128"))])
    methods = ("suponly", "meanteacher", "cutmix", "cdcl", "fixmatch", "unimatch")
    want = [Run("dsb2018", m, 128, s) for m in methods for s in (0, 1, 2)]
    want += [Run("dsb2018", "fullsup", 1, s) for s in (0, 1, 2)]
    runs = all_runs(mini)
    assert sorted(runs) == sorted(want)
    assert set(runs) <= set(all_runs(study))
    for run in runs:
        a = RunConfig.from_workflow(mini, *run).to_dict()
        b = RunConfig.from_workflow(study, *run).to_dict()
        assert a == b, run
    assert mini["threads"] == study["threads"]  # one thread per run: the same float sums


def test_paper_cpu_study_holds_every_mini_run_with_the_same_config():
    """config/studies/paper-cpu.yaml (Table 1 and Table 2 at DSB 1/128) is a superset of the mini
    benchmark: each mini run is one of its runs under the same resolved config, so the mini
    runs' files count for it."""
    from semibench.config import RunConfig

    base = [ROOT / "config" / "config.yaml"]
    mini = load_workflow_config([*base, ROOT / "config" / "studies" / "mini.yaml"])
    paper = load_workflow_config([*base, ROOT / "config" / "studies" / "paper-cpu.yaml"])
    table1 = ("suponly", "meanteacher", "tcsmv2", "cutmix", "cct", "gct", "cac", "cdcl", "fixmatch", "unimatch")
    want = [Run("dsb2018", m, 128, s) for m in table1 for s in (0, 1, 2)]
    want += [Run("dsb2018", "fullsup", 1, s) for s in (0, 1, 2)]
    want += [Run("dsb2018", f"cdcl-scheme{k}", 128, s) for k in range(1, 7) for s in (0, 1, 2)]
    runs = all_runs(paper)
    assert sorted(runs) == sorted(want)
    for run in all_runs(mini):
        assert run in runs
        assert RunConfig.from_workflow(mini, *run).to_dict() == RunConfig.from_workflow(paper, *run).to_dict(), run
    assert RunConfig.from_workflow(paper, "dsb2018", "gct", 128, 0).resolved().method_params["fd_channels"] == 64
