import hashlib
import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from semibench.data.loading import labeled_ids
from semibench.data.obtain import SampleRef, prepare
from semibench.data.splits import (
    LABEL_RATIOS,
    SplitPolicy,
    labeled_subset,
    make_split,
    round_half_up,
    split_to_json,
    write_split,
    write_split_file,
)
from semibench.data.tiling import tile_id
from semibench.errors import ConfigError, DataError
from semibench.registry import DATASETS

REPO = Path(__file__).resolve().parent.parent
FRACTIONS = SplitPolicy(val="0.1", test="0.2")
OFFICIAL = SplitPolicy(val="0.2", test="official")


def dsb_like(n=670):
    return [SampleRef(f"img{i:04d}", f"img{i:04d}", "train") for i in range(n)]


def monuseg_like(n_train=30, n_test=14):
    refs = []
    for subset, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image = f"{subset}-image-{i:02d}"
            refs += [SampleRef(tile_id(image, r, c), image, subset) for r in range(4) for c in range(4)]
    return refs


def test_round_half_up_is_not_bankers_rounding():
    assert [round_half_up(Fraction(x)) for x in ("0.5", "1.5", "2.5", "2.4999", "14.65625")] == [1, 2, 3, 2, 15]
    assert round(2.5) == 2  # what Python's round would have given


def check_contract(split, n_train, n_val, n_test, labeled):
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert (len(train), len(val), len(test)) == (n_train, n_val, n_test)
    assert not (train & val or train & test or val & test)
    assert list(split["labeled"]) == ["128", "64", "32", "16", "8", "1"]
    assert [len(split["labeled"][k]) for k in split["labeled"]] == labeled
    previous = set()
    for k in ("128", "64", "32", "16", "8", "1"):
        current = set(split["labeled"][k])
        assert previous <= current <= train
        previous = current
    assert set(split["labeled"]["1"]) == train
    for key in ("train", "val", "test"):
        assert split[key] == sorted(split[key])


def test_dsb_sizes_disjoint_nested():
    split = make_split("dsb2018", 0, dsb_like(), FRACTIONS)
    # max(1, round(469/k)): 3.66 -> 4, 7.33 -> 7, 14.66 -> 15, 29.31 -> 29, 58.6 -> 59
    check_contract(split, 469, 67, 134, [4, 7, 15, 29, 59, 469])
    assert set(split["train"]) | set(split["val"]) | set(split["test"]) == {r.id for r in dsb_like()}


def test_monuseg_whole_images_and_official_test():
    refs = monuseg_like()
    split = make_split("monuseg", 1, refs, OFFICIAL)
    check_contract(split, 384, 96, 224, [3, 6, 12, 24, 48, 384])
    image_of = {r.id: r.image for r in refs}
    train_images = {image_of[i] for i in split["train"]}
    val_images = {image_of[i] for i in split["val"]}
    assert len(train_images) == 24 and len(val_images) == 6 and not train_images & val_images
    assert {image_of[i] for i in split["test"]} == {f"test-image-{i:02d}" for i in range(14)}


def test_order_follows_the_documented_sha256_rule():
    # Independent re-statement of the rule: images sorted by sha256("<ds>:<seed>:split:<id>").
    refs = dsb_like(10)
    split = make_split("toy", 3, refs, FRACTIONS)
    ranked = sorted((r.id for r in refs), key=lambda i: hashlib.sha256(f"toy:3:split:{i}".encode()).hexdigest())
    assert split["train"] == sorted(ranked[:7])
    assert split["val"] == sorted(ranked[7:8])
    assert split["test"] == sorted(ranked[8:])
    by_label = sorted(split["train"], key=lambda i: hashlib.sha256(f"toy:3:labeled:{i}".encode()).hexdigest())
    assert split["labeled"]["8"] == sorted(by_label[:1])  # max(1, round(7/8)) = 1
    assert split["labeled"]["32"] == split["labeled"]["8"]  # max(1, round(7/32)) = 1


def test_half_counts_round_up():
    # n = 5: train = round(3.5) = 4 and val = round(0.5) = 1 (banker's rounding would give 4, 0)
    split = make_split("toy", 0, dsb_like(5), FRACTIONS)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (4, 1, 0)


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    refs = monuseg_like()
    a = write_split_file(make_split("monuseg", 0, refs, OFFICIAL), tmp_path / "a.json").read_bytes()
    shuffled = refs[:]
    random.Random(7).shuffle(shuffled)  # input order must not matter
    b = write_split_file(make_split("monuseg", 0, shuffled, OFFICIAL), tmp_path / "b.json").read_bytes()
    assert a == b
    other = make_split("monuseg", 1, refs, OFFICIAL)
    assert other["train"] != json.loads(a)["train"]
    assert other["labeled"]["32"] != json.loads(a)["labeled"]["32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp files left


def test_file_format_is_fixed():
    split = make_split("toy", 0, dsb_like(3), FRACTIONS)
    text = split_to_json(split)
    assert text.startswith('{\n "dataset": "toy",\n "seed": 0,\n "train": [\n  "img')
    assert text.endswith("}\n") and list(json.loads(text)) == ["dataset", "seed", "train", "val", "test", "labeled"]


def test_image_in_two_subsets_is_rejected():
    refs = [SampleRef("a_r0_c0", "a", "train"), SampleRef("a_r0_c1", "a", "test")]
    with pytest.raises(DataError, match="two subsets"):
        make_split("toy", 0, refs, OFFICIAL)


def test_write_split_from_prepared_manifest(tmp_path):
    cfg = {"count": 10, "size": 32, "workers": 1}
    prepare("synthetic", tmp_path / "data", cfg)
    out = write_split("synthetic", tmp_path / "data", 4, tmp_path / "splits" / "synthetic" / "seed4.json")
    recipe = DATASETS.get("synthetic")(cfg)
    expected = split_to_json(make_split("synthetic", 4, recipe.index({}), recipe.split_policy))
    assert out.read_text() == expected
    check_contract(json.loads(expected), 7, 1, 2, [1, 1, 1, 1, 1, 7])


def test_write_split_needs_prepared_data_and_a_known_dataset(tmp_path):
    with pytest.raises(DataError, match="semibench prepare"):
        write_split("synthetic", tmp_path, 0, tmp_path / "x.json")
    with pytest.raises(ConfigError, match="known: .*dsb2018"):
        write_split("nope", tmp_path, 0, tmp_path / "x.json")


@pytest.mark.parametrize("dataset,sizes", [
    ("dsb2018", (469, 67, 134, [4, 7, 15, 29, 59, 469])),
    ("monuseg", (384, 96, 224, [3, 6, 12, 24, 48, 384])),
])
def test_shipped_split_files_meet_the_contract(dataset, sizes):
    trains = []
    for seed in (0, 1, 2):
        path = REPO / "results" / "splits" / dataset / f"seed{seed}.json"
        split = json.loads(path.read_text())
        assert (split["dataset"], split["seed"]) == (dataset, seed)
        check_contract(split, *sizes)
        assert path.read_text() == split_to_json(split)  # the fixed format
        trains.append(split["train"])
    assert trains[0] != trains[1] != trains[2]
    assert LABEL_RATIOS == (128, 64, 32, 16, 8, 1)


# sha256 of json.dumps({train, val, test, labeled/32, labeled/16, labeled/8, labeled/1},
# sort_keys=True) of every shipped file as it stood before 1/64 and 1/128 were added: those
# subsets must never change (every published result rests on them), only new keys may appear.
SHIPPED_BEFORE_1_64 = {
    ("dsb2018", 0): "efdab5b3f7e2f2e6b9f434700c4f72d33892f49c26c8b1c9378239384c3f7912",
    ("dsb2018", 1): "ed879c38b1581eb7ef6d66e56f4ba9394249da7359a4873fe26f10f1fa91ab31",
    ("dsb2018", 2): "dcf616817672896f8c17c99831082fef84d42d1912df0998e2da1588e35338a2",
    ("monuseg", 0): "b46872f4c49c7b5e320e4d0dd800c93def370c62de4d37560685abfd5cd55967",
    ("monuseg", 1): "b6102f69681ccf7906f330d7236300add406c31f7101cca01b9a03952fd795f1",
    ("monuseg", 2): "ca1e6c3324993b921aab334d65d00ed534df0e3cf36f4c3c66f7e5b0e3fc4a61",
}


@pytest.mark.parametrize("dataset, seed", sorted(SHIPPED_BEFORE_1_64))
def test_shipped_subsets_of_the_paper_ratios_are_unchanged(dataset, seed):
    split = json.loads((REPO / "results" / "splits" / dataset / f"seed{seed}.json").read_text())
    parts = {k: split[k] for k in ("train", "val", "test")}
    parts.update({f"labeled/{k}": split["labeled"][k] for k in ("32", "16", "8", "1")})
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    assert digest == SHIPPED_BEFORE_1_64[(dataset, seed)]


@pytest.mark.parametrize("dataset", ["dsb2018", "monuseg"])
def test_new_ratios_are_nested_prefixes_of_the_documented_order(dataset):
    for seed in (0, 1, 2):
        split = json.loads((REPO / "results" / "splits" / dataset / f"seed{seed}.json").read_text())
        # the order restated independently: sha256("<ds>:<seed>:labeled:<id>")
        ranked = sorted(split["train"], key=lambda i: (hashlib.sha256(
            f"{dataset}:{seed}:labeled:{i}".encode()).hexdigest(), i))
        n = len(ranked)
        for k in ("128", "64", "32"):
            count = max(1, int(Fraction(n, int(k)) + Fraction(1, 2)))
            assert split["labeled"][k] == sorted(ranked[:count])
        assert set(split["labeled"]["128"]) < set(split["labeled"]["64"]) < set(split["labeled"]["32"])


def test_any_ratio_is_derived_nested_in_the_stored_ones():
    split = make_split("dsb2018", 0, dsb_like(), FRACTIONS)
    stored = {k: set(v) for k, v in split["labeled"].items()}
    for k, n in ((256, 2), (96, 5), (48, 10), (4, 117), (2, 235)):  # round(469/k), half up
        derived = labeled_ids(split, k)
        assert len(derived) == n and derived == sorted(derived)
        for key, ids in stored.items():  # nested with every stored subset, either way round
            assert set(derived) <= ids if int(key) <= k else ids <= set(derived)
    first = min(split["train"], key=lambda i: hashlib.sha256(f"dsb2018:0:labeled:{i}".encode()).hexdigest())
    assert labeled_ids(split, 10_000) == [first]  # max(1, ...): the first of the order
    # a stored key is read from the file, not recomputed
    edited = dict(split, labeled=dict(split["labeled"], **{"8": ["x"]}))
    assert labeled_subset(edited, 8) == ["x"]


def test_a_ratio_is_not_derived_from_a_split_that_follows_another_rule():
    split = make_split("dsb2018", 0, dsb_like(), FRACTIONS)
    split["labeled"]["32"] = sorted(split["train"][-15:])  # a hand-picked subset
    with pytest.raises(DataError, match=r"no labeled subset for 1/100, and its stored subset 1/32"):
        labeled_ids(split, 100)
