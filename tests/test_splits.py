import hashlib
import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from semibench.errors import ConfigError, DataError
from semibench.obtain import SampleRef, prepare
from semibench.registry import DATASETS
from semibench.splits import (LABEL_RATIOS, SplitPolicy, make_split, round_half_up, split_to_json,
                              write_split, write_split_file)
from semibench.tiling import tile_id

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
    assert list(split["labeled"]) == ["32", "16", "8", "1"]
    assert [len(split["labeled"][k]) for k in split["labeled"]] == labeled
    previous = set()
    for k in ("32", "16", "8", "1"):
        current = set(split["labeled"][k])
        assert previous <= current <= train
        previous = current
    assert set(split["labeled"]["1"]) == train
    for key in ("train", "val", "test"):
        assert split[key] == sorted(split[key])


def test_dsb_sizes_disjoint_nested():
    split = make_split("dsb2018", 0, dsb_like(), FRACTIONS)
    check_contract(split, 469, 67, 134, [15, 29, 59, 469])
    assert set(split["train"]) | set(split["val"]) | set(split["test"]) == {r.id for r in dsb_like()}


def test_monuseg_whole_images_and_official_test():
    refs = monuseg_like()
    split = make_split("monuseg", 1, refs, OFFICIAL)
    check_contract(split, 384, 96, 224, [12, 24, 48, 384])
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
    check_contract(json.loads(expected), 7, 1, 2, [1, 1, 1, 7])


def test_write_split_needs_prepared_data_and_a_known_dataset(tmp_path):
    with pytest.raises(DataError, match="semibench prepare"):
        write_split("synthetic", tmp_path, 0, tmp_path / "x.json")
    with pytest.raises(ConfigError, match="known: .*dsb2018"):
        write_split("nope", tmp_path, 0, tmp_path / "x.json")


@pytest.mark.parametrize("dataset,sizes", [
    ("dsb2018", (469, 67, 134, [15, 29, 59, 469])),
    ("monuseg", (384, 96, 224, [12, 24, 48, 384])),
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
    assert LABEL_RATIOS == (32, 16, 8, 1)
