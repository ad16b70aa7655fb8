"""Claims over training runs, on hand cases: the two-level bootstrap (seeds, then images), the
seeds needed, the claim in words, and rliable's IQM and probability of improvement."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from semibench.report import build, runlevel, twolevel
from semibench.report.stats import StatOptions, seed_cases
from tests.report_runs import write_run

OPT = StatOptions(seed=0)


def _constant(*per_seed, n=10):
    """Per seed, n images whose difference is that seed's value."""
    return [np.full(n, v) for v in per_seed]


# ---------------------------------------------------------------- the two-level bootstrap

def test_two_seeds_that_disagree_span_both_seeds():
    """Seed 0 gains 7 points on every image, seed 1 loses 1. The two draws are seed 1 twice
    (1/4: -0.01), once each (1/2: +0.03) or seed 0 twice (1/4: +0.07), so the 95 % percentile
    interval is exactly [-0.01, +0.07]. Pooling the 20 (seed, image) differences before
    resampling (the flattened hierarchy) gives about 0.03 ± 0.018, which excludes 0."""
    low, high = twolevel.two_level_ci(_constant(0.07, -0.01), OPT)
    assert (low, high) == (pytest.approx(-0.01), pytest.approx(0.07))


def test_two_seeds_that_agree_keep_the_image_level_spread():
    """Both seeds: images alternate 0 and 0.1 (seed mean 0.05). Each drawn seed resamples its
    10 images, so the statistic is 0.005 x Binomial(20, 1/2): 2.5 % / 97.5 % quantiles 6 and 14
    -> [0.03, 0.07], within one step of 0.005 from 2000 resamples (P(X <= 5) = 0.021 is close to
    2.5 %). Resampling the seeds only would give [0.05, 0.05]."""
    alternating = np.tile([0.0, 0.1], 5)
    low, high = twolevel.two_level_ci([alternating, alternating.copy()], OPT)
    assert st.binom.ppf([0.025, 0.975], 20, 0.5).tolist() == [6.0, 14.0]
    assert 0.025 - 1e-12 <= low <= 0.03 + 1e-12 and 0.07 - 1e-12 <= high <= 0.075 + 1e-12
    assert low > 0  # established over runs


def test_one_seed_has_no_two_level_interval():
    assert np.isnan(twolevel.two_level_ci(_constant(0.05), OPT)).all()
    assert twolevel.seeds_needed(_constant(0.05), OPT) is None


def test_seeds_needed_against_the_binomial_by_hand():
    """Seeds gaining 7 points or nothing (no image noise): a simulated study of n seeds has k
    of the +7 seeds, k ~ Binomial(n, 1/2), mean 0.07 k/n and seed sd 0.07 sqrt(p(1-p)), and its
    CI excludes 0 when mean > 1.96 sd / sqrt(n). Power 0.773 at 7 seeds, 0.855 at 8: 8."""
    z = st.norm.ppf(0.975)

    def power(n):
        k = np.arange(n + 1)
        p = k / n
        ok = 0.07 * p - z * 0.07 * np.sqrt(p * (1 - p)) / np.sqrt(n) > 0
        return st.binom.pmf(k, n, 0.5)[ok].sum()

    assert power(7) == pytest.approx(0.7734, abs=1e-4) and power(8) == pytest.approx(0.8555, abs=1e-4)
    assert twolevel.seeds_needed(_constant(0.07, 0.0), OPT) == 8
    assert twolevel.seeds_needed(_constant(0.07, 0.07), OPT) == 2  # no spread at all
    assert twolevel.seeds_needed(_constant(0.05, -0.05), OPT) is None  # no difference: "> 50"
    assert twolevel.seeds_needed(_constant(0.05, -0.03), OPT) is None  # too small for 50 seeds


def test_the_claim_in_words():
    holds, words = twolevel.claim(True, -0.0002, 0.07, [0.07, 0.0084, -0.0002])
    assert holds == "images"
    assert words == ("significant over test images; not established over training runs "
                     "(3 seeds: +7.00, +0.84, \u22120.02)")
    assert twolevel.claim(True, 0.01, 0.07, [0.05, 0.03])[0] == "both"
    assert twolevel.claim(False, 0.01, 0.07, [0.05, 0.03]) == (
        "runs", "not significant over test images; established over training runs "
                "(2 seeds: +5.00, +3.00)")
    assert twolevel.claim(False, -0.07, -0.01, [-0.05, -0.03])[0] == "runs"  # below 0 counts too
    assert twolevel.claim(True, np.nan, np.nan, [0.05]) == (
        "images", "significant over test images; not assessable over training runs (one seed: "
                  "no spread)")


# ---------------------------------------------------------------- rliable on hand matrices

def test_rliable_iqm_and_mean_by_hand():
    """2 runs x 4 tasks: the IQM drops the lowest and highest quarter of all 8 scores
    (1, 2 and 7, 100): mean(3, 4, 5, 6) = 4.5; the mean is 128 / 8 = 16."""
    matrix = np.array([[1.0, 2, 3, 4], [5, 6, 7, 100]])
    agg = runlevel.aggregates(matrix, seed=0, reps=200)
    assert agg["iqm"][0] == pytest.approx(4.5) and agg["mean"][0] == pytest.approx(16.0)


def test_stratified_bootstrap_resamples_runs_within_tasks():
    """Each task's runs are equal, so every within-task resample has the same mean: the CI is
    the point. Resampling the 4 scores across tasks would move it (0 to 1)."""
    agg = runlevel.aggregates(np.array([[0.0, 1.0], [0.0, 1.0]]), seed=0, reps=200)
    assert agg["mean"] == (0.5, 0.5, 0.5)


def test_probability_of_improvement_counts_a_tie_as_half():
    """X = (1, 2, 3) vs Y = (2, 2, 0): 1 beats 0; 2 ties twice (1/2 each) and beats 0; 3 beats
    all: (1 + 2 + 3) / 9 = 2/3 (ties as wins: 7/9, as losses: 5/9). A second task where X and Y
    are equal is 1/2, and rliable averages the tasks: (2/3 + 1/2) / 2."""
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[2.0], [2.0], [0.0]])
    p, low, high = runlevel.p_improvement(x, y, seed=0, reps=300)
    assert p == pytest.approx(2 / 3)
    assert 0 <= low <= p <= high <= 1 and low < high
    both = runlevel.p_improvement(np.hstack([x, np.zeros((3, 1))]), np.hstack([y, np.zeros((3, 1))]),
                                  seed=0, reps=50)
    assert both[0] == pytest.approx((2 / 3 + 1 / 2) / 2)
    _, metrics = runlevel.rliable()
    assert metrics.probability_of_improvement(x, y) == pytest.approx(2 / 3)  # rliable's own
    # no overlap: every resample is 1
    assert runlevel.p_improvement(x + 10, y, seed=0, reps=100) == (1.0, 1.0, 1.0)


def test_rliable_intervals_are_seeded_and_leave_numpys_state_alone():
    rng = np.random.default_rng(3)
    x, y = rng.random((3, 2)), rng.random((3, 2))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = runlevel.p_improvement(x, y, seed=7, reps=100), runlevel.aggregates(x, seed=7, reps=100)
    assert (np.random.get_state()[1] == before).all()
    assert first == (runlevel.p_improvement(x, y, seed=7, reps=100),
                     runlevel.aggregates(x, seed=7, reps=100))


# ---------------------------------------------------------------- in the report

SHIFTS = (0.07, 0.0084, -0.0002)  # the DSB 1/128 seeds: CDCL - SupOnly per seed
TOY = {"grid": {"datasets": ["dsb2018"], "methods": ["suponly", "cdcl"], "ratios": [32],
                "fullsup": False, "seeds": [0, 1, 2]},
       "report": {"n_resamples": 999, "n_boot_rank": 50}}


def _seed_disagreement_runs(root, shifts=SHIFTS):
    base = np.random.default_rng(0).uniform(0.6, 0.8, 14)
    files = []
    for seed, shift in enumerate(shifts):
        files.append(write_run(root, "dsb2018", "suponly", 32, seed, base))
        files.append(write_run(root, "dsb2018", "cdcl", 32, seed, base + shift))
    return files


def test_significant_over_images_but_not_over_runs_is_said_so(tmp_path):
    """Every image gains (the seed mean of its differences is +2.61 points), so the image-level
    test is significant; one seed of three loses, so the two-level CI reaches below 0. The
    comparisons, their page and Table 1's footnote say which claim holds."""
    results, plan = build.load(_seed_disagreement_runs(tmp_path / "runs"), TOY)
    build.write_stats(results, plan, tmp_path / "stats")
    comps = pd.read_csv(tmp_path / "stats" / "comparisons.csv")
    row = comps[(comps["a"] == "cdcl") & (comps["b"] == "suponly")].iloc[0]
    assert row["significant"] and row["delta"] == pytest.approx(np.mean(SHIFTS))
    # all three draws of seed 2 (1/27 > 2.5 %): the lower bound is seed 2's own -0.02 points
    assert row["two_level_low"] == pytest.approx(-0.0002) and row["two_level_high"] == pytest.approx(0.07)
    words = ("significant over test images; not established over training runs "
             "(3 seeds: +7.00, +0.84, \u22120.02)")
    assert row["holds_over"] == "images" and row["claim"] == words
    assert int(row["seeds_needed"]) > 3
    # P(CDCL run > SupOnly run): the SupOnly runs are equal, two CDCL seeds beat them: 6/9
    assert row["p_improvement"] == pytest.approx(2 / 3)
    assert row["p_improvement_low"] <= 2 / 3 <= row["p_improvement_high"]
    cols = list(comps.columns)
    assert cols[cols.index("ci_high") + 1:cols.index("ci_high") + 3] == ["two_level_low", "two_level_high"]
    assert words in (tmp_path / "stats" / "comparisons.html").read_text()
    comps_frame = build.read_comparisons(tmp_path / "stats" / "comparisons.csv")
    build.write_tables(results, plan, tmp_path / "tables", comps_frame)
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert ("Significant over test images; not established over training runs: SupOnly vs CDCL "
            "(dsb2018 1/32; 3 seeds: \u22127.00, \u22120.84, +0.02), CDCL vs SupOnly (dsb2018 1/32; 3 "
            "seeds: +7.00, +0.84, \u22120.02).") in md
    assert "$-$0.02" in (tmp_path / "tables" / "table1.tex").read_text()
    # runlevel.csv: rliable's numbers for the same runs
    run = pd.read_csv(tmp_path / "stats" / "runlevel.csv")
    cdcl = run[(run["method"] == "cdcl") & (run["scope"] == "cell")].set_index("statistic")
    base_mean = np.mean(pd.read_csv(tmp_path / "runs/dsb2018/suponly/r32/seed0/per_image.csv")["dice"])
    assert cdcl.loc["mean", "value"] == pytest.approx(base_mean + np.mean(SHIFTS))
    assert cdcl.loc["iqm", "value"] == pytest.approx(cdcl.loc["mean", "value"])  # 3 runs: no trim
    assert cdcl.loc["p_improvement", "vs"] == "suponly"
    assert cdcl.loc["p_improvement", "value"] == pytest.approx(2 / 3)


def test_runs_that_agree_hold_over_both(tmp_path):
    results, plan = build.load(_seed_disagreement_runs(tmp_path / "runs", (0.05, 0.04, 0.06)), TOY)
    comps = build.compute_stats(results, plan)["comparisons"]
    row = comps[(comps["a"] == "cdcl") & (comps["b"] == "suponly")].iloc[0]
    assert row["holds_over"] == "both" and row["two_level_low"] == pytest.approx(0.04)
    assert row["claim"].startswith("significant over test images; established over training runs")
    assert row["seeds_needed"] == "2" and row["p_improvement"] == 1.0


def test_annotate_uses_each_seeds_own_images():
    """DSB re-draws the test set per seed: the two-level resample draws images of the drawn
    seed only. Seed 0 tests img0-img3 (+0.1 each), seed 1 img2-img5 (0 each): the interval is
    [0, 0.1], while pooling per image (img2, img3 in both) would never reach 0."""
    rows = []
    for seed, (images, gain) in enumerate(((range(0, 4), 0.1), (range(2, 6), 0.0))):
        for i in images:
            for method, v in (("a", 0.5 + gain), ("b", 0.5)):
                rows.append({"dataset": "dsb2018", "ratio": 8, "method": method, "seed": seed,
                             "id": f"img{i}", "source_id": f"img{i}", "dice": v})
    seed_level = seed_cases(pd.DataFrame(rows), "dice")
    diffs = twolevel.seed_differences(seed_level, "dsb2018", 8, "a", "b")
    assert [d.tolist() for d in diffs] == [[0.1] * 4, [0.0] * 4]
    assert twolevel.two_level_ci(diffs, OPT) == (pytest.approx(0.0), pytest.approx(0.1))


def test_footnote_groups_the_claims():
    frame = pd.DataFrame({
        "family": ["vs_baseline"] * 3 + ["ablation"], "dataset": "d", "ratio": 8,
        "a": ["x", "y", "z", "w"], "b": "base",
        "holds_over": ["images", "neither", "images", "both"],
        "claim": ["significant over test images; not assessable over training runs (one seed: no spread)",
                  "not significant over test images; not assessable over training runs (one seed: no spread)",
                  "significant over test images; not assessable over training runs (one seed: no spread)",
                  "significant over test images; established over training runs (2 seeds: +1.00, +2.00)"]})
    note = twolevel.claims_note(frame, ["vs_baseline"], str.upper)
    assert note.endswith("excludes 0). Significant over test images; not assessable over training runs "
                         "(one seed: no spread): X vs BASE (d 1/8), Z vs BASE (d 1/8).")
    assert "Y vs" not in note and "W vs" not in note  # neither; another family
    assert twolevel.claims_note(frame, ["ablation"], str).endswith(
        "Significant over test images; established over training runs: w vs base (d 1/8; 2 seeds: "
        "+1.00, +2.00).")
