"""Train/val/test splits and nested labeled subsets, identical on every machine.

Written to ``results/splits/<dataset>/seed<S>.json`` as::

    {"dataset", "seed", "train": [ids], "val": [ids], "test": [ids],
     "labeled": {"128": [...], "64": [...], "32": [...], "16": [...], "8": [...], "1": [...]}}

Rules (data-layer issue, section 3):

- The partition is over *source images*; a sample (a MoNuSeg tile, a DSB image) follows its
  image, so tiles of one image never straddle two parts.
- Fractional policy (DSB, synthetic): n_train = round((1 − val − test)·n), n_val = round(val·n),
  test = the rest. Official policy (MoNuSeg): the publisher's ``test`` subset is the test set;
  n_val = round(val·n) of the n training images go to val, the rest to train.
- Samples of subset ``unlabeled`` (a folder dataset's images without masks) are listed under
  ``unlabeled`` (only when there are some, so other files keep their bytes): unlabeled at every
  ratio, never in train/val/test.
- ``labeled[k]`` = max(1, round(n_train / k)) train samples; nested, because every ratio takes a
  prefix of one ordering (the *labeled order*, :func:`labeled_order`): labeled[128] ⊂ labeled[64]
  ⊂ labeled[32] ⊂ labeled[16] ⊂ labeled[8] ⊂ labeled[1] = train. The file stores the ratios of
  :data:`LABEL_RATIOS`; any other k is the same prefix of the same order (:func:`labeled_subset`),
  so a ratio a user adds is nested with the stored ones without a new file. 1/64 and 1/128 came
  after 1/32-1/8: adding them left every earlier subset byte for byte as it was.
- round() rounds half up (exact fractions, not floats, not banker's rounding).
- Randomness: items are ordered by sha256(f"{dataset}:{seed}:{salt}:{id}") (salt ``split`` for
  images, ``labeled`` for samples), ties by id. No hash(), no set order, no RNG whose stream
  could change between library versions.
- Lists in the file are sorted by id; JSON is written with ``indent=1`` and a trailing newline,
  atomically (temporary file + rename), so regeneration is byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

from semibench.atomic import write_atomic
from semibench.data.obtain import SampleRef
from semibench.data.prepared import PreparedDataset
from semibench.errors import DataError
from semibench.layout import SPLITS_DIR, split_path

# The paper's 1/32, 1/16, 1/8 and all; 1/64 and 1/128 for regimes with more headroom for
# unlabeled data (stored in the shipped files; any other k is derived, see labeled_subset).
LABEL_RATIOS = (128, 64, 32, 16, 8, 1)


@dataclass(frozen=True)
class SplitPolicy:
    """``val``/``test``: fractions of the source images as decimal strings (exact), or
    ``test="official"`` to use the publisher's test subset."""

    val: str
    test: str

    @property
    def official_test(self) -> bool:
        return self.test == "official"


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def order_key(dataset: str, seed: int, salt: str, item: str) -> tuple[str, str]:
    return hashlib.sha256(f"{dataset}:{seed}:{salt}:{item}".encode()).hexdigest(), item


def _shuffled(dataset: str, seed: int, salt: str, items: Iterable[str]) -> list[str]:
    return sorted(items, key=lambda i: order_key(dataset, seed, salt, i))


def make_split(dataset: str, seed: int, refs: Sequence, policy: SplitPolicy,
               ratios: Sequence[int] = LABEL_RATIOS) -> dict:
    """``refs``: ``SampleRef``s or manifest sample rows (dicts with ``id``, ``image``, ``subset``)."""
    refs = [r if isinstance(r, SampleRef) else SampleRef(r["id"], r["image"], r["subset"]) for r in refs]
    subset_of: dict[str, str] = {}
    samples_of: dict[str, list[str]] = {}
    for r in refs:
        if subset_of.setdefault(r.image, r.subset) != r.subset:
            raise DataError(f"{dataset}: image {r.image} has samples in two subsets")
        samples_of.setdefault(r.image, []).append(r.id)
    pool = [i for i, s in subset_of.items() if s == "train"]
    n = len(pool)
    order = _shuffled(dataset, seed, "split", pool)
    n_val = round_half_up(Fraction(policy.val) * n)
    if policy.official_test:
        n_train = n - n_val
        test_images = [i for i, s in subset_of.items() if s == "test"]
    else:
        n_train = round_half_up((1 - Fraction(policy.val) - Fraction(policy.test)) * n)
        test_images = order[n_train + n_val:]
    if n_train < 1:
        raise DataError(f"{dataset}: {n} training images are too few to split")
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": test_images}
    ids = {k: sorted(s for img in imgs for s in samples_of[img]) for k, imgs in parts.items()}
    ranked = labeled_order(dataset, seed, ids["train"])
    labeled = {str(k): labeled_prefix(ranked, k) for k in sorted(set(ratios), reverse=True)}
    split = {"dataset": dataset, "seed": int(seed), "train": ids["train"], "val": ids["val"],
             "test": ids["test"], "labeled": labeled}
    pool = sorted(s for i, sub in subset_of.items() if sub == "unlabeled" for s in samples_of[i])
    if pool:  # images without masks (a folder dataset's pool): unlabeled at every ratio
        split["unlabeled"] = pool
    return split


def labeled_order(dataset: str, seed: int, train_ids: Iterable[str]) -> list[str]:
    """The order whose prefixes are the labeled subsets: sha256 rule with salt ``labeled``."""
    return _shuffled(dataset, seed, "labeled", train_ids)


def labeled_count(n_train: int, k: int) -> int:
    """max(1, round(n_train / k)) with round half up."""
    if k < 1:
        raise DataError(f"label ratio 1/{k}: k must be an integer >= 1")
    return max(1, round_half_up(Fraction(n_train, k)))


def labeled_prefix(ranked: Sequence[str], k: int) -> list[str]:
    return sorted(ranked[:labeled_count(len(ranked), k)])


def labeled_subset(split: dict, k: int) -> list[str]:
    """The labeled ids of 1/k: the stored ``labeled[k]`` when the file has it, else the prefix
    of the labeled order, after checking that the stored subsets are prefixes of that order
    (a hand-made split file that follows another rule is refused rather than mixed with ours)."""
    stored = split.get("labeled") or {}
    if str(k) in stored:
        return list(stored[str(k)])
    ranked = labeled_order(split["dataset"], int(split["seed"]), split["train"])
    for key, ids in stored.items():
        if sorted(ids) != labeled_prefix(ranked, int(key)):
            raise DataError(f"split of {split['dataset']} seed {split['seed']} has no labeled subset "
                            f"for 1/{k}, and its stored subset 1/{key} does not follow the split rule, "
                            f"so 1/{k} cannot be derived nested in it; add labeled[\"{k}\"] to the file")
    return labeled_prefix(ranked, k)


def split_to_json(split: dict) -> str:
    return json.dumps(split, indent=1, ensure_ascii=True) + "\n"


def write_split_file(split: dict, out: str | Path) -> Path:
    return write_atomic(out, split_to_json(split), encoding="ascii")


def default_split_path(name: str, seed: int, splits_dir: str | Path = SPLITS_DIR) -> Path:
    return split_path(name, seed, splits_dir)


def write_split(name: str, data_dir: str | Path, seed: int, out: str | Path | None = None,
                ds_cfg: dict | None = None) -> Path:
    """Split the prepared dataset ``<data_dir>/prepared/<name>`` with its recipe's policy
    (``ds_cfg``: the dataset's config options, which a folder dataset's policy depends on)."""
    from semibench.data.obtain import get_recipe

    policy = get_recipe(name, ds_cfg).split_policy
    manifest = PreparedDataset(Path(data_dir) / "prepared" / name).manifest
    if manifest.get("dataset") != name:
        raise DataError(f"{data_dir}/prepared/{name}/manifest.json is for dataset {manifest.get('dataset')!r}")
    split = make_split(name, seed, manifest["samples"], policy)
    return write_split_file(split, out if out is not None else default_split_path(name, seed))
