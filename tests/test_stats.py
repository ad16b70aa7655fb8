"""The report's statistics on hand-made frames, checked against scipy and by brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from semibench.errors import DataError
from semibench.report import stats
from semibench.report.stats import Family, StatOptions

OPT = StatOptions(n_resamples=9999, seed=0)


def _per_image(values: dict, tiles: int = 1, seeds=(0,), dataset="monuseg", ratio=32) -> pd.DataFrame:
    """values: method -> array (seeds x images) of Dice; each image gets `tiles` equal tiles."""
    rows = []
    for method, arr in values.items():
        arr = np.asarray(arr, dtype=float).reshape(len(seeds), -1)
        for si, seed in enumerate(seeds):
            for i, v in enumerate(arr[si]):
                for t in range(tiles):
                    rows.append({"dataset": dataset, "method": method, "ratio": ratio, "seed": seed,
                                 "id": f"img{i}_r{t}_c0", "source_id": f"img{i}", "dice": v})
    return pd.DataFrame(rows)


def _brute_force_p(d) -> float:
    """Two-sided zsplit signed-rank p by enumerating every sign flip of the non-zero d."""
    d = np.round(np.asarray(d, float), 12)
    ranks = st.rankdata(np.abs(d))
    zero_half = ranks[d == 0].sum() / 2
    nz = ranks[d != 0]
    t_obs = ranks[d > 0].sum() + zero_half
    centre = ranks.sum() / 2
    ts = [sum(r for r, s in zip(nz, signs) if s) + zero_half
          for signs in itertools.product((0, 1), repeat=nz.size)]
    ts = np.array(ts)
    return float(np.mean(np.abs(ts - centre) >= abs(t_obs - centre) - 1e-12))


def test_exact_p_matches_scipy_and_brute_force():
    d = np.array([0.11, -0.02, 0.35, 0.07, 0.21, -0.05, 0.16, 0.09, 0.3, 0.04])  # no ties or zeros
    w, p, test, resamples = stats.signed_rank(d, OPT)
    ref = st.wilcoxon(d, method="exact")
    assert test == "Wilcoxon exact" and resamples is None
    assert p == pytest.approx(ref.pvalue, rel=1e-12) and w == ref.statistic
    assert p == pytest.approx(_brute_force_p(d), rel=1e-12)
    # W = min(R+, R-): the negatives have ranks 1 (0.02) and 3 (0.05) -> 4
    assert w == 4.0


def test_ties_and_zeros_use_the_exact_permutation_distribution():
    d = np.array([0.1, -0.1, 0.2, 0.2, 0.0, 0.3, 0.15, -0.02, 0.0])  # ties and two zeros
    w, p, test, resamples = stats.signed_rank(d, OPT)
    assert test == "Wilcoxon exact (all 512 sign flips)" and resamples == 2 ** 9
    assert p == pytest.approx(_brute_force_p(d), rel=1e-9)
    assert p == pytest.approx(st.wilcoxon(d, zero_method="zsplit", method=st.PermutationMethod(
        n_resamples=2 ** 9)).pvalue, rel=1e-12)  # scipy's own sign-flip test
    assert w == st.wilcoxon(d, zero_method="zsplit").statistic
    # zeros are split, not dropped: dropping them (scipy's default "wilcox") gives another p
    assert p != pytest.approx(st.wilcoxon(d[d != 0], method="exact").pvalue)
    # roundoff must not create ties that are not there: 0.3 - 0.1 vs 0.2 exactly
    assert stats.signed_rank(np.array([0.3 - 0.1, -0.2, 0.2]), OPT)[1] == \
        stats.signed_rank(np.array([0.2, -0.2, 0.2]), OPT)[1]


def test_all_zero_differences_and_large_n():
    assert stats.signed_rank(np.zeros(14), OPT)[1:] == (1.0, "none (all differences zero)", None)
    rng = np.random.default_rng(1)
    d = np.round(rng.normal(0.01, 0.05, 300), 3)
    w, p, test, resamples = stats.signed_rank(d, OPT)
    assert test == "Wilcoxon normal approximation" and resamples is None
    assert p == pytest.approx(st.wilcoxon(d, zero_method="zsplit", method="asymptotic").pvalue)


def test_rank_biserial_by_hand():
    # non-zero |d| ranks: 1 -> 1, 2 -> 2, 3 -> 3; R+ = 1 + 3, R- = 2 -> (4 - 2) / 6
    assert stats.rank_biserial(np.array([1.0, -2.0, 3.0, 0.0])) == pytest.approx(1 / 3)
    assert stats.rank_biserial(np.array([0.1, 0.2])) == 1.0
    assert stats.rank_biserial(np.zeros(3)) == 0.0


def test_holm_order_and_nan():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    expected = np.array([0.03, 0.06, 0.06, 0.02, np.nan])
    np.testing.assert_allclose(stats.holm(p), expected, rtol=1e-12)
    assert np.all(stats.holm([0.5, 0.9]) == [1.0, 1.0])  # capped at 1


def test_confidence_intervals():
    d = np.array([0.02, 0.05, -0.01, 0.03, 0.04, 0.0, 0.06, 0.01, 0.02, 0.03, 0.05, -0.02, 0.04, 0.01])
    low, high, tl, th = stats.mean_ci(d, OPT)
    ref = st.bootstrap((d,), np.mean, method="BCa", n_resamples=9999, rng=np.random.default_rng(0))
    assert (low, high) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)
    half = st.t.ppf(0.975, 13) * d.std(ddof=1) / np.sqrt(14)
    assert (tl, th) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
    assert low < d.mean() < high
    assert stats.mean_ci(np.full(5, 0.1), OPT) == pytest.approx((0.1,) * 4)  # no spread


def test_monuseg_tiles_reduce_to_images_and_duplicates_change_nothing():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.6, 0.8, (3, 14))
    b = a - rng.normal(0.01, 0.02, (3, 14))
    one = stats.seed_cases(_per_image({"x": a, "cdcl": b}, tiles=1, seeds=(0, 1, 2)), "dice")
    many = stats.seed_cases(_per_image({"x": a, "cdcl": b}, tiles=16, seeds=(0, 1, 2)), "dice")
    pd.testing.assert_frame_equal(one, many)
    r1 = stats.compare(one, "monuseg", 32, "x", "cdcl", OPT)
    r16 = stats.compare(many, "monuseg", 32, "x", "cdcl", OPT)
    assert r1 == r16
    assert r1["n_cases"] == 14 and r1["n_seeds"] == 3  # the unit is the image, not the tile
    # the values tested: per image, the mean over the three seeds
    d = np.round(a.mean(0) - b.mean(0), 12)
    assert r1["delta"] == pytest.approx(d.mean())
    assert r1["p"] == pytest.approx(st.wilcoxon(d, method="exact").pvalue)
    # per-seed deltas and the sign agreement
    for s in range(3):
        assert f"s{s}:{(a[s] - b[s]).mean():+.6f}" in r1["seed_deltas"]
    k = int(np.sum(np.sign((a - b).mean(1)) == np.sign(d.mean())))
    assert r1["seeds_same_sign"] == f"{k}/3"


def test_tiles_of_one_image_are_averaged_not_pooled():
    frame = pd.DataFrame([
        {"dataset": "m", "ratio": 8, "method": "a", "seed": 0, "id": "i1_t1", "source_id": "i1", "dice": 0.2},
        {"dataset": "m", "ratio": 8, "method": "a", "seed": 0, "id": "i1_t2", "source_id": "i1", "dice": 0.6},
        {"dataset": "m", "ratio": 8, "method": "a", "seed": 1, "id": "i1_t1", "source_id": "i1", "dice": 0.5},
        {"dataset": "m", "ratio": 8, "method": "a", "seed": 1, "id": "i2", "source_id": "i2", "dice": 0.9},
    ])
    seeds = stats.seed_cases(frame, "dice")
    assert seeds["value"].tolist() == pytest.approx([0.4, 0.5, 0.9])
    cases = stats.case_values(seeds)
    # i1: seeds 0 (0.4) and 1 (0.5) -> 0.45 over 2 seeds; i2 only in seed 1 (DSB-like re-drawn test set)
    assert cases[["source_id", "value", "n_seeds"]].to_dict("records") == [
        {"source_id": "i1", "value": pytest.approx(0.45), "n_seeds": 2},
        {"source_id": "i2", "value": pytest.approx(0.9), "n_seeds": 1}]


def test_mismatched_keys_are_refused_naming_what_is_missing():
    a = np.full((2, 5), 0.7)
    frame = stats.seed_cases(_per_image({"x": a, "cdcl": a - 0.01}, seeds=(0, 1)), "dice")
    cut = frame[~((frame["method"] == "cdcl") & (frame["seed"] == 1) & (frame["source_id"] == "img3"))]
    with pytest.raises(DataError, match=r"cannot pair x with cdcl on monuseg 1/32: their \(seed, "
                                        r"image\) keys differ: cdcl lacks seed 1: 1 image\(s\) \(img3\)"):
        stats.compare(cut, "monuseg", 32, "x", "cdcl", OPT)
    no_seed = frame[~((frame["method"] == "x") & (frame["seed"] == 0))]
    with pytest.raises(DataError, match=r"x lacks seed 0: 5 image\(s\) \(img0, img1, img2, \.\.\.\)"):
        stats.compare(no_seed, "monuseg", 32, "x", "cdcl", OPT)
    with pytest.raises(DataError, match="no per-image results for y"):
        stats.compare(frame, "monuseg", 32, "y", "cdcl", OPT)


def test_families_holm_within_dataset_and_untested_rows():
    rng = np.random.default_rng(5)
    base = rng.uniform(0.5, 0.9, (2, 14))
    frames = []
    for dataset in ("dsb2018", "monuseg"):
        vals = {"cdcl": base, "suponly": base - 0.05 - rng.normal(0, .01, base.shape),
                "mt": base - rng.normal(0, .03, base.shape)}
        frames.append(_per_image(vals, seeds=(0, 1), dataset=dataset))
    seed_level = stats.seed_cases(pd.concat(frames), "dice")
    fam = Family("vs_reference", "cdcl", ("suponly", "mt", "cdcl", "gone"),
                 (("dsb2018", 32), ("monuseg", 32)))
    out = stats.run_families(seed_level, [fam], "dice", OPT)
    assert list(out.columns) == stats.COMPARISON_COLUMNS
    assert len(out) == 6  # 3 methods (not cdcl itself) x 2 datasets
    gone = out[out["a"] == "gone"]
    assert gone["p"].isna().all() and gone["note"].str.startswith("not tested: cannot pair gone").all()
    for dataset in ("dsb2018", "monuseg"):
        part = out[(out["dataset"] == dataset) & out["p"].notna()]
        np.testing.assert_allclose(part["p_holm"], stats.holm(part["p"]))  # m = 2, not 4
    sup = out[(out["a"] == "suponly") & (out["dataset"] == "monuseg")].iloc[0]
    assert sup["delta"] < 0 and sup["significant"] and sup["rbc"] == -1.0
    with pytest.raises(DataError, match="cannot pair gone"):
        stats.run_families(seed_level, [fam], "dice", OPT, strict=True)


def test_friedman_and_pairwise_against_scipy():
    rng = np.random.default_rng(7)
    x = rng.uniform(0.5, 0.9, 12)
    vals = {"a": x + 0.05, "b": x + rng.normal(0, 0.02, 12), "c": x - 0.04}
    seed_level = stats.seed_cases(_per_image(vals), "dice")
    omni, pairs = stats.friedman(seed_level, [("monuseg", 32)], ["a", "b", "c"], options=OPT)
    ref = st.friedmanchisquare(vals["a"], vals["b"], vals["c"])
    row = omni.iloc[0]
    assert row["chi2"] == pytest.approx(ref.statistic) and row["p"] == pytest.approx(ref.pvalue)
    assert row["kendall_w"] == pytest.approx(ref.statistic / (12 * 2))
    assert row["rank_a"] == 1.0 and row["rank_c"] == 3.0  # a always best, c always worst
    assert len(pairs) == 3
    ab = pairs[(pairs["a"] == "a") & (pairs["b"] == "c")].iloc[0]
    assert ab["p"] == pytest.approx(st.wilcoxon(vals["a"] - vals["c"], method="exact").pvalue)
    np.testing.assert_allclose(pairs["p_holm"], stats.holm(pairs["p"]))


def test_ranking_stability():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.5, 0.9, 20)
    vals = {"best": x + 0.2, "mid": x + rng.normal(0, 0.01, 20), "mid2": x + rng.normal(0, 0.01, 20)}
    seed_level = stats.seed_cases(_per_image(vals), "dice")
    freq, summary = stats.ranking_stability(seed_level, [("monuseg", 32)], list(vals), options=OPT)
    s = summary.set_index("method")
    assert s.loc["best", "winner_freq"] == 1.0 and s.loc["best", "rank_full"] == 1
    assert s.loc["mid", "winner_freq"] == 0.0
    per_method = freq.groupby("method")["freq"].sum()
    np.testing.assert_allclose(per_method, 1.0)  # one rank per resample
    assert 0.0 < s["kendall_tau"].iloc[0] <= 1.0
    # same seed -> same numbers
    assert stats.ranking_stability(seed_level, [("monuseg", 32)], list(vals), options=OPT)[1].equals(summary)


# ---------------------------------------------------------------- exact p, NaN, pairing (issue 22)

# 14 MoNuSeg-like images: one zero difference and tied |d| (0.032 twice, 0.01 three times)
MONUSEG_D = np.array([0.0, 0.032, 0.032, -0.01, -0.009, 0.01, 0.01, 0.029, -0.007, 0.024, 0.043,
                      -0.005, 0.031, -0.006])


def _hand_enumeration_p(d) -> float:
    """Every one of the 2^n sign vectors, R+ with a zero's rank split in half, two-sided p as
    twice the smaller tail (scipy's definition), counted exactly."""
    d = np.asarray(d, float)
    ranks = st.rankdata(np.abs(d))

    def r_plus(x):
        return ranks[x > 0].sum() + ranks[x == 0].sum() / 2

    observed = r_plus(d)
    null = [r_plus(d * np.array(signs)) for signs in itertools.product((1, -1), repeat=d.size)]
    low = sum(t <= observed + 1e-9 for t in null)
    high = sum(t >= observed - 1e-9 for t in null)
    return min(1.0, 2 * min(low, high) / len(null))


def test_monuseg_like_exact_p_is_the_same_for_every_report_seed():
    expected = _hand_enumeration_p(MONUSEG_D)
    assert expected == 860 / 16384  # 0.0525: just above alpha
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, 14)
    frame = _per_image({"x": base + MONUSEG_D, "cdcl": base}, tiles=16)  # 16 tiles per image
    seed_level = stats.seed_cases(frame, "dice")
    for seed in (0, 1, 2, 99):
        row = stats.compare(seed_level, "monuseg", 32, "x", "cdcl", StatOptions(seed=seed))
        assert row["n_cases"] == 14 and row["p"] == expected
        assert row["test"] == "Wilcoxon exact (all 16384 sign flips)" and row["resamples"] == 16384
    # what the report did before: 9999 random flips, p on either side of 0.05 with the seed
    old = {s: stats.sign_flip_p(MONUSEG_D, 9999, s) for s in range(10)}
    assert len(set(old.values())) > 1 and min(old.values()) < 0.05 < max(old.values())


def test_resampling_only_above_twenty_images():
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(0.01, 0.03, 30), 2)  # 2 decimals: ties
    d[0] = 0.0
    w, p, test, resamples = stats.signed_rank(d, StatOptions(n_resamples=999, seed=4))
    assert test == "Wilcoxon sign-flip resampling (999 random flips, seed 4)" and resamples == 999
    assert stats.signed_rank(d[:21], OPT).resamples == 9999
    assert stats.signed_rank(d[:20], OPT)[2:] == ("Wilcoxon exact (all 1048576 sign flips)", 2 ** 20)


def test_nan_tile_leaves_its_image_out_with_a_note():
    rng = np.random.default_rng(6)
    a = rng.uniform(0.6, 0.8, 14)
    b = a - rng.normal(0.02, 0.01, 14)
    frame = _per_image({"x": a, "cdcl": b}, tiles=4)
    frame.loc[(frame["method"] == "x") & (frame["id"] == "img3_r2_c0"), "dice"] = np.nan
    seed_level = stats.seed_cases(frame, "dice")
    row = stats.compare(seed_level, "monuseg", 32, "x", "cdcl", OPT)
    assert row["n_cases"] == 13
    assert row["note"] == "1 (seed, image) pair(s) left out, NaN dice: x seed 0 img3 (sample img3_r2_c0)"
    # the same as leaving the image out of both methods by hand
    without = stats.seed_cases(frame[frame["source_id"] != "img3"], "dice")
    by_hand = stats.compare(without, "monuseg", 32, "x", "cdcl", OPT)
    assert (row["p"], row["delta"], row["W"]) == (by_hand["p"], by_hand["delta"], by_hand["W"])
    # a NaN on every image: reported untested, never an error (even under strict families)
    frame["dice"] = np.where(frame["method"] == "x", np.nan, frame["dice"])
    fam = Family("vs_reference", "cdcl", ("x",), (("monuseg", 32),))
    out = stats.run_families(stats.seed_cases(frame, "dice"), [fam], "dice", OPT, strict=True)
    assert np.isnan(out["p"].iloc[0]) and out["note"].iloc[0].startswith(
        "not tested: no (seed, image) pair with a value on both sides; 14 (seed, image) pair(s) "
        "left out, NaN dice: x seed 0 img0 (sample img0_r0_c0 img0_r1_c0 img0_r2_c0 img0_r3_c0)")


def _dsb_like(n_methods=3, seeds=(0, 1, 2)) -> pd.DataFrame:
    """A DSB-like cell: each seed's test set draws 12 of 20 images (so images have 1-3 seeds)."""
    rng = np.random.default_rng(11)
    quality = rng.uniform(0.6, 0.9, 20)
    rows = []
    for seed in seeds:
        images = sorted(rng.choice(20, 12, replace=False))
        for j in range(n_methods):
            for i in images:
                rows.append({"dataset": "dsb2018", "ratio": 8, "method": f"m{j}", "seed": seed,
                             "id": f"im{i:02d}", "source_id": f"im{i:02d}",
                             "dice": quality[i] + 0.02 * j + rng.normal(0, 0.03)})
    return pd.DataFrame(rows)


def _friedman_row(frame, methods=("m0", "m1", "m2")):
    omni, pairs = stats.friedman(stats.seed_cases(frame, "dice"), [("dsb2018", 8)], list(methods),
                                 options=OPT)
    return omni.iloc[0], pairs


@pytest.mark.parametrize("case", ["missing file", "one seed", "NaN image"])
def test_friedman_on_the_explicitly_paired_subset(case):
    full = _dsb_like()
    if case == "missing file":  # m2's seed-1 per_image.csv is gone
        frame = full[~((full["method"] == "m2") & (full["seed"] == 1))]
        paired = full[full["seed"] != 1]
        expect = "m2 lacks seed 1: 12 image(s)"
    elif case == "one seed":  # m2 ran seed 0 only
        frame = full[(full["method"] != "m2") | (full["seed"] == 0)]
        paired = full[full["seed"] == 0]
        expect = "m2 lacks seed 1: 12 image(s) (im"
    else:  # one image of m1 in seed 2 is NaN
        image = full[full["seed"] == 2]["source_id"].iloc[0]
        frame = full.copy()
        frame.loc[(frame["method"] == "m1") & (frame["seed"] == 2) & (frame["source_id"] == image),
                  "dice"] = np.nan
        paired = full[~((full["seed"] == 2) & (full["source_id"] == image))]
        expect = f"NaN dice: m1 seed 2 {image}"
    row, pairs = _friedman_row(frame)
    ref, ref_pairs = _friedman_row(paired)
    assert ref["note"] == ""  # the explicit subset is complete
    assert (row["n_cases"], row["chi2"], row["p"]) == (ref["n_cases"], ref["chi2"], ref["p"])
    assert [row[f"rank_m{j}"] for j in range(3)] == [ref[f"rank_m{j}"] for j in range(3)]
    assert expect in row["note"] and row["note"].startswith("on the ")
    np.testing.assert_array_equal(pairs["p"], ref_pairs["p"])  # the CD diagram's pairwise tests
    _, summary = stats.ranking_stability(stats.seed_cases(frame, "dice"), [("dsb2018", 8)],
                                         ["m0", "m1", "m2"], options=OPT)
    _, ref_summary = stats.ranking_stability(stats.seed_cases(paired, "dice"), [("dsb2018", 8)],
                                             ["m0", "m1", "m2"], options=OPT)
    pd.testing.assert_frame_equal(summary, ref_summary)


def test_friedman_drops_a_method_without_results_and_says_so():
    row, pairs = _friedman_row(_dsb_like(n_methods=3), methods=("m0", "m1", "m2", "gone"))
    ref, _ = _friedman_row(_dsb_like(n_methods=3))
    assert row["k"] == 3 and row["chi2"] == ref["chi2"] and row["methods"] == "m0 m1 m2"
    assert "gone left out (no per-image results)" in row["note"]


def test_sign_disagreement_is_explained():
    # two large gains, six small losses: mean > 0, rank-biserial r < 0
    d = np.array([0.5, 0.4, -0.01, -0.02, -0.03, -0.04, -0.05, -0.06])
    base = np.full(8, 0.4)
    row = stats.compare(stats.seed_cases(_per_image({"x": base + d, "y": base}), "dice"),
                        "monuseg", 32, "x", "y", OPT)
    assert row["delta"] > 0 > row["rbc"] == pytest.approx((15 - 21) / 36)
    assert row["note"].startswith("Δ and r disagree in sign: the method gains on a few images "
                                  "and loses on most")
