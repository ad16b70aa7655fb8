"""Keep a Markdown page's quoted report files in step with the report (``semibench report
--quote-into PAGE``), so a results page never shows a table its runs no longer give.

A quoted block is delimited in the page by two HTML comments (invisible when rendered)::

    <!-- semibench report: tables/table1.md -->
    ...replaced by the file's text...
    <!-- /semibench report -->

The path is relative to the report's ``--out`` directory. The file's title line (``# ...``) is
dropped and its section headings (``## dsb2018``) become bold lines, so the quote sits under
the page's own headings; everything else is copied verbatim."""
from __future__ import annotations

import re
from pathlib import Path

from semibench.atomic import write_atomic
from semibench.errors import ConfigError

BEGIN = re.compile(r"^<!-- semibench report: (?P<path>\S+) -->$")
END = "<!-- /semibench report -->"


def quoted(text: str) -> list[str]:
    """A report file's lines as the page shows them."""
    lines = []
    for line in text.splitlines():
        if line.startswith("# "):
            continue
        lines.append(f"**{line[3:].strip()}**" if line.startswith("## ") else line)
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def sync(page: str, report_dir: Path, name: str = "page") -> str:
    """``page`` with every quoted block replaced by the current file under ``report_dir``."""
    out, inside, line_no = [], None, 0
    for line_no, line in enumerate(page.splitlines(), 1):
        begin = BEGIN.match(line)
        if inside is None:
            out.append(line)
            if begin:
                source = Path(report_dir) / begin["path"]
                if not source.is_file():
                    raise ConfigError(f"{name}:{line_no} quotes {begin['path']}, which the report "
                                      f"did not write under {report_dir} (quote after the step "
                                      f"that writes it)")
                out += quoted(source.read_text(encoding="utf-8"))
                inside = line_no
        elif line == END:
            out.append(line)
            inside = None
        elif begin:
            raise ConfigError(f"{name}:{line_no}: a quote opens before the one at line {inside} "
                              f"is closed with {END}")
    if inside is not None:
        raise ConfigError(f"{name}:{inside}: quote not closed with {END}")
    return "\n".join(out) + "\n"


def quote_into(pages, report_dir: Path) -> list[Path]:
    """Rewrite each page whose quotes changed (atomically); checks every page first, so a bad
    marker in one leaves all of them as they were."""
    new = {}
    for page in map(Path, pages):
        if not page.is_file():
            raise ConfigError(f"--quote-into {page}: no such file")
        text = page.read_text(encoding="utf-8")
        if not any(BEGIN.match(line) for line in text.splitlines()):
            raise ConfigError(f"--quote-into {page}: no '<!-- semibench report: FILE -->' block "
                              f"to fill")
        new[page] = (text, sync(text, report_dir, str(page)))
    return [write_atomic(page, after) for page, (before, after) in new.items() if after != before]
