"""Table 1 from hand-made metrics files: means and sample standard deviations computed by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from semibench.cli import main
from semibench.errors import DataError
from semibench.report.tables import METRICS, read_table1, write_table1


def _metrics(per_image: dict, pooled: dict | None = None, meta: dict | None = None) -> dict:
    """A metrics.json: every metric gets the given value unless listed (dice varies below)."""
    doc = {"per_image_mean": {m: per_image.get(m, 0.5) for m in METRICS},
           "pooled": {m: (pooled or {}).get(m, 0.25) for m in METRICS}}
    if meta is not None:  # as semibench.evaluate writes it
        doc["meta"] = meta
    return doc


def _write(root: Path, dataset, method, ratio, seed, doc) -> Path:
    path = root / dataset / method / f"r{ratio}" / f"seed{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def files(tmp_path) -> list[Path]:
    runs = tmp_path / "runs"
    out = []
    # suponly 1/8 on dsb2018: dice 0.80, 0.82, 0.84 -> mean 0.82, std sqrt((.02²+0+.02²)/2) = 0.02
    #                         jaccard 0.6, 0.7, 0.9 -> mean 0.7333, std 0.152753 (below)
    for seed, dice, jac, pooled_dice in ((0, 0.80, 0.6, 0.70), (1, 0.82, 0.7, 0.76), (2, 0.84, 0.9, 0.73)):
        out.append(_write(runs, "dsb2018", "suponly", 8, seed,
                          _metrics({"dice": dice, "jaccard": jac}, {"dice": pooled_dice})))
    # meanteacher 1/32 (two seeds): dice 0.5 and 0.7 -> mean 0.6, std sqrt(2·0.1²/1) = 0.141421...
    for seed, dice in ((0, 0.5), (1, 0.7)):
        out.append(_write(runs, "dsb2018", "meanteacher", 32, seed, _metrics({"dice": dice})))
    # fullsup on monuseg, one seed: no spread
    out.append(_write(runs, "monuseg", "fullsup", 1, 0, _metrics({"dice": 0.9})))
    return out


def _row(rows, dataset, ratio, method, metric):
    hits = [r for r in rows if (r["dataset"], r["ratio"], r["method"], r["metric"]) ==
            (dataset, ratio, method, metric)]
    assert len(hits) == 1
    return hits[0]


def test_means_and_sample_stds(files, tmp_path):
    csv_path, md_path = write_table1(files, tmp_path / "tables")
    assert csv_path.read_text().splitlines()[0] == "dataset,ratio,method,metric,mean,std,n_seeds"
    rows = read_table1(csv_path)
    assert len(rows) == 3 * len(METRICS)  # 3 (dataset, ratio, method) cells x 5 metrics
    r = _row(rows, "dsb2018", 8, "suponly", "dice")
    assert r["mean"] == pytest.approx(0.82, abs=1e-12)
    assert r["std"] == pytest.approx(0.02, abs=1e-12)
    assert r["n_seeds"] == 3
    r = _row(rows, "dsb2018", 8, "suponly", "jaccard")
    # mean 2.2/3; deviations -2/15, -1/30, 1/6: squares 0.017778 + 0.001111 + 0.027778 = 0.046667,
    # / (n - 1) = 0.023333, sqrt = 0.152753
    mean = 2.2 / 3
    assert r["mean"] == pytest.approx(mean, abs=1e-12)
    assert r["std"] == pytest.approx(math.sqrt(((0.6 - mean) ** 2 + (0.7 - mean) ** 2 + (0.9 - mean) ** 2) / 2), abs=1e-12)
    assert r["std"] == pytest.approx(0.1527525231651947, abs=1e-12)
    r = _row(rows, "dsb2018", 8, "suponly", "accuracy")
    assert (r["mean"], r["std"]) == (pytest.approx(0.5), pytest.approx(0.0, abs=1e-15))
    r = _row(rows, "dsb2018", 32, "meanteacher", "dice")
    assert (r["mean"], r["std"], r["n_seeds"]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)), 2)
    r = _row(rows, "monuseg", 1, "fullsup", "dice")
    assert r["mean"] == pytest.approx(0.9) and math.isnan(r["std"]) and r["n_seeds"] == 1
    # one seed: std left empty in the CSV
    assert "monuseg,1,fullsup,dice,0.9,,1" in csv_path.read_text().splitlines()


def test_row_order_and_markdown(files, tmp_path):
    csv_path, md_path = write_table1(files, tmp_path / "tables")
    rows = read_table1(csv_path)
    cells = list(dict.fromkeys((r["dataset"], r["ratio"], r["method"]) for r in rows))
    # fewest labels first within a dataset; datasets in order of appearance
    assert cells == [("dsb2018", 32, "meanteacher"), ("dsb2018", 8, "suponly"), ("monuseg", 1, "fullsup")]
    assert [r["metric"] for r in rows[:5]] == list(METRICS)
    md = md_path.read_text()
    assert "per-image mean" in md and "ddof = 1" in md
    assert "| labeled | method | DC | JC | ACC | SP | SE | n |" in md
    assert "| 1/8 | suponly | 0.8200 ± 0.0200 | 0.7333 ± 0.1528 | 0.5000 ± 0.0000 |" in md
    assert "| 1/1 | fullsup | 0.9000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 1 |" in md
    assert md.index("## dsb2018") < md.index("## monuseg")


def test_pooled_convention(files, tmp_path):
    csv_path, md_path = write_table1(files, tmp_path / "tables", convention="pooled")
    r = _row(read_table1(csv_path), "dsb2018", 8, "suponly", "dice")
    # pooled dice 0.70, 0.76, 0.73 -> mean 0.73, std sqrt((.03² + .03² + 0)/2) = 0.03
    assert r["mean"] == pytest.approx(0.73, abs=1e-12)
    assert r["std"] == pytest.approx(0.03, abs=1e-12)
    assert "pooled" in md_path.read_text()


def test_coordinates_from_run_metadata_win_over_path(tmp_path):
    meta = {"dataset": "synthetic", "method": "cdcl", "ratio": 16, "seed": 4}
    f = tmp_path / "dsb2018" / "suponly" / "r8" / "seed0" / "metrics.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps(_metrics({"dice": 0.3}, meta=meta)))
    rows = read_table1(write_table1([f], tmp_path / "t")[0])
    assert {(r["dataset"], r["ratio"], r["method"], r["n_seeds"]) for r in rows} == {("synthetic", 16, "cdcl", 1)}


def test_bad_inputs(files, tmp_path):
    with pytest.raises(DataError, match="two metrics files for dsb2018/suponly/r8/seed0"):
        write_table1(files + files[:1], tmp_path / "t")
    broken = _write(tmp_path / "runs", "dsb2018", "cdcl", 8, 0, {"per_image_mean": {"dice": 0.5}})
    with pytest.raises(DataError, match=r"cdcl/r8/seed0/metrics.json: per_image_mean.jaccard is missing"):
        write_table1([broken], tmp_path / "t2")
    nan = _write(tmp_path / "runs", "dsb2018", "cdcl", 16, 0, _metrics({"dice": math.nan}))
    with pytest.raises(DataError, match="per_image_mean.dice is missing or not a finite number"):
        write_table1([nan], tmp_path / "t3")
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps(_metrics({})))
    with pytest.raises(DataError, match="cannot tell its dataset/method/ratio/seed"):
        write_table1([stray], tmp_path / "t4")
    assert not (tmp_path / "t2" / "table1.csv").exists()
    assert not (tmp_path / "t3").exists() and not (tmp_path / "t4").exists()


def test_cli_report_with_glob(files, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["report", "--runs", str(tmp_path / "runs" / "**" / "metrics.json"), "--out", str(out)]) == 0
    assert len(read_table1(out / "table1.csv")) == 15
    assert main(["report", "--runs", str(tmp_path / "nothing" / "*.json"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == \
        "semibench: error: no metrics files given or matched (--metrics FILE ... or --runs GLOB)"
