"""The workflow's file layout, defined once (semibench/layout.py), and the one atomic writer."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from semibench.atomic import write_atomic, write_json_atomic
from semibench.layout import RUN_PATH, log_path, run_dir, run_key, split_path
from semibench.workflow.grid import Run

ROOT = Path(__file__).resolve().parent.parent


def test_paths_by_hand():
    assert run_key("dsb2018", "cdcl", 32, 0) == "dsb2018/cdcl/r32/seed0"
    assert run_dir("monuseg", "fullsup", 1, 2) == Path("results/runs/monuseg/fullsup/r1/seed2")
    assert run_dir("d", "m", 8, 1, "/x/runs") == Path("/x/runs/d/m/r8/seed1")
    assert log_path("evaluate", "d", "m", 8, 1) == Path("logs/evaluate/d/m/r8/seed1.log")
    assert split_path("dsb2018", 2) == Path("results/splits/dsb2018/seed2.json")
    assert Run("d", "cdcl-scheme1", 32, 0).rel_dir() == "d/cdcl-scheme1/r32/seed0"
    m = RUN_PATH.search("/tmp/results/runs/dsb2018/cdcl-scheme1/r32/seed2/metrics.json")
    assert m.groupdict() == {"dataset": "dsb2018", "method": "cdcl-scheme1", "ratio": "32", "seed": "2"}


def test_no_other_module_spells_a_run_or_split_path():
    """The layout is said once: a second spelling would drift (it did: four copies before)."""
    spelled = re.compile(r"seed\{+(args\.)?seed\}+|/r\{+(args\.)?ratio\}+|\*/r\*/seed\*")
    files = [p for d in ("semibench", "methods", "datasets", "rules") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".smk")] + [ROOT / "Snakefile"]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.name != "layout.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]
    assert offenders == []


def test_write_atomic_text_bytes_and_writer(tmp_path):
    out = write_atomic(tmp_path / "a" / "b.txt", "x\ny\n")
    assert out.read_bytes() == b"x\ny\n"
    write_atomic(out, b"\x00\x01")
    assert out.read_bytes() == b"\x00\x01"
    write_atomic(out, lambda p: p.write_bytes(b"from a writer"))
    assert out.read_bytes() == b"from a writer"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.txt"]  # no temporary left


def test_write_json_atomic_is_indented_json_with_str_for_the_rest(tmp_path):
    out = write_json_atomic(tmp_path / "m.json", {"a": 1, "p": tmp_path / "x", "l": [0.5]})
    assert out.read_text() == '{\n "a": 1,\n "p": "%s",\n "l": [\n  0.5\n ]\n}\n' % (tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    out = write_atomic(tmp_path / "f.json", "old")

    def half_then_fail(p: Path):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(out, half_then_fail)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(UnicodeEncodeError):
        write_atomic(out, "é", encoding="ascii")  # split files are ASCII: refused, not mangled
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_new_folder_appears_whole_or_not_at_all(tmp_path):
    from semibench.atomic import new_folder

    out = tmp_path / "out"
    out.mkdir()  # an empty folder may be replaced
    with new_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (out / "a.txt").exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError):
        with new_folder(tmp_path / "failed") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no folder, no temporary
