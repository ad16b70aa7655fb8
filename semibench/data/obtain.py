"""Obtain, verify and prepare a dataset: archive lookup, download, checksums, orchestration.

Archive lookup (per archive a recipe declares), first hit wins:

1. ``datasets.<name>.archive`` in the config: a file (single-archive datasets), a directory
   holding the archives under their official or alias names, or a mapping
   ``{official file name: path}``. A configured path that does not exist is an error, never
   silently skipped.
2. ``<data_dir>/raw/<name>/<official file name>`` (or one of the recipe's alias names, e.g. the
   repackaged ``MoNuSegTrainingData.zip``).
3. Download to ``<data_dir>/raw/<name>/<official file name>`` (``obtain`` only): http(s) with a
   tqdm progress bar and ``Range`` resume from a ``.part`` file; Google Drive ids through the
   confirm-token page. A failed download raises one :class:`DataError` giving the URL and the
   exact path to place the file.

Checksums: a file this code downloads from the official URL must match the official sha256
(when the publisher gives one). A user-provided archive is checked against ``sha256`` from the
config when configured (mismatch -> DataError naming the file); otherwise its sha256 is recorded
and the record's ``note`` says whether it equals the official bytes. Repackaged copies (other
bytes, same members) are legitimate: ``verify`` checks their contents.

Config keys read here (``datasets.<name>``), besides each recipe's own (see its docstring):
``archive`` (str or {file name: str}), ``sha256`` (str or {file name: str}), ``url`` (str or
{file name: str}; replaces the official URL), ``download_timeout`` (seconds per network
operation, default 20), ``workers`` (processes for ``prepare``, default min(cpu count, 8)).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from PIL import Image
from tqdm import tqdm

from semibench.atomic import write_json_atomic
from semibench.data.prepared import PreparedWriter
from semibench.errors import ConfigError, DataError
from semibench.registry import DATASETS

DOWNLOAD_TIMEOUT = 20.0  # seconds per socket operation: fail fast when offline
CHUNK = 1 << 20
COMMON_KEYS = frozenset({"archive", "sha256", "url", "download_timeout", "workers"})


@dataclass(frozen=True)
class ArchiveSpec:
    """One file the publisher distributes. ``kind``: ``http`` or ``gdrive`` (``url`` then holds
    a drive.google.com link with ``id=``). ``aliases``: other names the same content is known by."""

    file_name: str
    url: str
    sha256: str | None
    kind: str = "http"
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class SampleRef:
    """A sample the model sees: its id, the source image it comes from, the publisher's subset."""

    id: str
    image: str
    subset: str  # "train" | "test"


class Recipe:
    """Base class of dataset recipes (``datasets/<name>.py``). Subclasses set ``archives``,
    ``split_policy`` and ``option_keys`` and implement ``index``, ``verify`` and ``prepare``;
    ``archives`` arguments are ``{official file name: Path}``."""

    name = ""
    archives: tuple[ArchiveSpec, ...] = ()
    option_keys: frozenset[str] = frozenset()
    split_policy: Any = None  # semibench.data.splits.SplitPolicy

    def __init__(self, options: Mapping | None = None):
        self.options = dict(options or {})
        unknown = sorted(set(self.options) - COMMON_KEYS - set(self.option_keys))
        if unknown:
            known = sorted(COMMON_KEYS | set(self.option_keys))
            raise ConfigError(f"datasets.{self.name}: unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(known)}")
        workers = self.options.get("workers", min(os.cpu_count() or 1, 8))
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"datasets.{self.name}.workers must be a positive integer, got {workers!r}")
        self.workers = workers
        timeout = self.options.get("download_timeout", DOWNLOAD_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"datasets.{self.name}.download_timeout must be a positive number of "
                              f"seconds, got {timeout!r}")
        self.download_timeout = float(timeout)

    def index(self, archives: Mapping[str, Path]) -> list[SampleRef]:
        raise NotImplementedError

    def verify(self, archives: Mapping[str, Path]) -> dict:
        raise NotImplementedError

    def prepare(self, archives: Mapping[str, Path], writer: PreparedWriter) -> None:
        raise NotImplementedError

    def source_fingerprint(self) -> dict[str, str]:
        """Sources of generated datasets (no archives); archive datasets record archive sha256s."""
        return {}

    def check_source(self) -> Any:
        """Checks of inputs that are not archives (a folder's files), run before any work: by
        ``obtain`` and when the workflow starts. Raises DataError; the default checks nothing."""


def recipe_of(name: str, ds_cfg: Mapping | None = None) -> str:
    """The registered recipe behind dataset ``name``: ``datasets.<name>.recipe`` (a folder
    dataset under a name the user picks), else ``name`` itself."""
    recipe = (ds_cfg or {}).get("recipe", name)
    if not isinstance(recipe, str):
        raise ConfigError(f"datasets.{name}.recipe must be a recipe name, got {recipe!r}")
    return recipe


def get_recipe(name: str, ds_cfg: Mapping | None = None) -> Recipe:
    """The recipe object of dataset ``name`` with its config options; ``recipe.name`` is ``name``."""
    options = {k: v for k, v in (ds_cfg or {}).items() if k != "recipe"}
    cls = DATASETS.get(recipe_of(name, ds_cfg))
    recipe = cls.__new__(cls)
    recipe.name = name  # before __init__, so its messages say datasets.<name>
    recipe.__init__(options)
    return recipe


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- archive lookup

def raw_dir(name: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / "raw" / name


def _per_archive(value: Any, spec: ArchiveSpec, recipe: Recipe, key: str) -> Any:
    """A config value that is either one value (single-archive datasets, or a directory for
    ``archive``) or a mapping by official/alias file name."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        names = {a.file_name for a in recipe.archives} | {n for a in recipe.archives for n in a.aliases}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"datasets.{recipe.name}.{key}: unknown archive name(s) {unknown}; "
                              f"expected {sorted(a.file_name for a in recipe.archives)}")
        for n in (spec.file_name, *spec.aliases):
            if n in value:
                return value[n]
        return None
    if len(recipe.archives) > 1 and key != "archive":
        raise ConfigError(f"datasets.{recipe.name}.{key} must map each archive's file name "
                          f"({', '.join(a.file_name for a in recipe.archives)}) to a value")
    return value


def find_archive(spec: ArchiveSpec, recipe: Recipe, data_dir: str | Path) -> tuple[Path, str] | None:
    """(path, source) of an archive already on disk, or None."""
    configured = _per_archive(recipe.options.get("archive"), spec, recipe, "archive")
    if configured is not None:
        p = Path(os.path.expanduser(str(configured)))
        if p.is_dir():
            for n in (spec.file_name, *spec.aliases):
                if (p / n).is_file():
                    return p / n, "config"
            raise DataError(f"datasets.{recipe.name}.archive: directory {p} holds none of "
                            f"{', '.join(repr(n) for n in (spec.file_name, *spec.aliases))}")
        if len(recipe.archives) > 1 and not isinstance(recipe.options.get("archive"), Mapping):
            raise ConfigError(f"datasets.{recipe.name}.archive must be a directory or a mapping "
                              f"{{file name: path}} ({len(recipe.archives)} archives)")
        if not p.is_file():
            raise DataError(f"datasets.{recipe.name}.archive: {p} does not exist")
        return p, "config"
    local = raw_dir(recipe.name, data_dir)
    for n in (spec.file_name, *spec.aliases):
        if (local / n).is_file():
            return local / n, "data_dir"
    return None


def _missing_message(spec: ArchiveSpec, url: str, dest: Path, recipe: Recipe, why: str) -> str:
    return (f"{spec.file_name} is not available ({why}). Download it from {url} and place it at "
            f"{dest.resolve()} (or set datasets.{recipe.name}.archive in the config)")


def locate(recipe: Recipe, data_dir: str | Path, download: bool) -> dict[str, dict]:
    """{official file name: {"path", "source", "url"}} for every archive of ``recipe``."""
    out = {}
    for spec in recipe.archives:
        url = _per_archive(recipe.options.get("url"), spec, recipe, "url") or spec.url
        found = find_archive(spec, recipe, data_dir)
        dest = raw_dir(recipe.name, data_dir) / spec.file_name
        if found is None:
            if not download:
                raise DataError(_missing_message(spec, url, dest, recipe,
                                                 "not found; run `semibench obtain` first"))
            expected = spec.sha256 if url == spec.url else None
            configured = _per_archive(recipe.options.get("sha256"), spec, recipe, "sha256")
            try:
                download_file(url, dest, expected_sha256=(configured or expected), timeout=recipe.download_timeout,
                              kind="gdrive" if "drive.google.com" in url else "http")
            except DownloadError as e:
                raise DataError(_missing_message(spec, url, dest, recipe, f"download failed: {e}")) from None
            found = (dest, "download")
        out[spec.file_name] = dict(path=found[0], source=found[1], url=url)
    return out


def check_archive(spec: ArchiveSpec, path: Path, recipe: Recipe) -> dict:
    """Hash ``path``, enforce a configured sha256, and describe how it relates to the official bytes."""
    sha = sha256_file(path)
    configured = _per_archive(recipe.options.get("sha256"), spec, recipe, "sha256")
    if configured is not None and sha != str(configured).strip().lower():
        raise DataError(f"{path}: sha256 {sha} does not match the configured "
                        f"datasets.{recipe.name}.sha256 {configured}")
    if spec.sha256 is None:
        note = "the publisher gives no sha256 for this file; recorded for reproducibility"
    elif sha == spec.sha256:
        note = "identical to the official download"
    else:
        note = (f"differs from the official download (sha256 {spec.sha256}): a repackaged copy; "
                "`semibench verify` checks its contents")
    return dict(path=str(Path(path).resolve()), sha256=sha, official_sha256=spec.sha256,
                matches_official=None if spec.sha256 is None else sha == spec.sha256,
                configured_sha256=configured, note=note)


# ---------------------------------------------------------------- the three CLI entry points

def _archive_records(recipe: Recipe, located: Mapping[str, dict]) -> dict:
    """archives.json: per archive, the file found now (path, sha256, how it was found)."""
    return {fn: dict(check_archive(_spec(recipe, fn), loc["path"], recipe),
                     source=loc["source"], url=loc["url"]) for fn, loc in located.items()}


def obtain(name: str, data_dir: str | Path = "data", ds_cfg: Mapping | None = None) -> dict:
    """Find or download every archive; write ``<data_dir>/raw/<name>/archives.json``."""
    recipe = get_recipe(name, ds_cfg)
    recipe.check_source()  # before anything is written
    located = locate(recipe, data_dir, download=True)
    records = _archive_records(recipe, located)
    write_json_atomic(raw_dir(name, data_dir) / "archives.json", records)
    return records


def verify(name: str, data_dir: str | Path = "data", ds_cfg: Mapping | None = None) -> dict:
    """Check checksums and contents; write ``<data_dir>/raw/<name>/verified.json``. An archive
    replaced since ``obtain`` (a truncated download swapped for the real file) is recorded anew
    in ``archives.json`` too, so the two files never name different bytes."""
    recipe = get_recipe(name, ds_cfg)
    recipe.check_source()  # before anything is written
    out_path = raw_dir(name, data_dir) / "verified.json"
    out_path.unlink(missing_ok=True)  # a failed verify must not leave an old success behind
    located = locate(recipe, data_dir, download=False)
    found = _archive_records(recipe, located)
    archives_json = raw_dir(name, data_dir) / "archives.json"
    try:
        recorded = json.loads(archives_json.read_text())
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded != json.loads(json.dumps(found, default=str)):
        write_json_atomic(archives_json, found)  # written before verified.json: stays older
    records = {fn: {k: v for k, v in r.items() if k not in ("source", "url")}
               for fn, r in found.items()}
    summary = recipe.verify({fn: Path(loc["path"]) for fn, loc in located.items()})
    result = dict(dataset=name, archives=records, summary=summary)
    write_json_atomic(out_path, result)
    return result


def prepare(name: str, data_dir: str | Path = "data", ds_cfg: Mapping | None = None) -> Path:
    """Write ``<data_dir>/prepared/<name>/`` (see :mod:`semibench.data.prepared`) atomically."""
    recipe = get_recipe(name, ds_cfg)
    recipe.check_source()  # before anything is written
    located = locate(recipe, data_dir, download=False)
    archives = {fn: Path(loc["path"]) for fn, loc in located.items()}
    sources = {fn: check_archive(_spec(recipe, fn), p, recipe)["sha256"] for fn, p in archives.items()}
    root = Path(data_dir) / "prepared" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(f".{name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with PreparedWriter(root, name) as writer:
            writer.sources = sources or recipe.source_fingerprint()
            recipe.prepare(archives, writer)
            _check_matches_index(recipe, archives, writer)
            return writer.commit()
    finally:
        clear_zip_cache()


def _check_matches_index(recipe: Recipe, archives: Mapping[str, Path], writer: PreparedWriter) -> None:
    """Splits may be computed from ``index()`` alone, so it must list exactly what was prepared."""
    written = [(s["id"], s["image"], s["subset"]) for s in writer.samples]
    indexed = [(r.id, r.image, r.subset) for r in recipe.index(archives)]
    if written != indexed:
        raise DataError(f"{recipe.name}: prepared samples differ from the recipe's index "
                        f"({len(written)} vs {len(indexed)}); this is a bug in datasets/{recipe.name}.py")


def _spec(recipe: Recipe, file_name: str) -> ArchiveSpec:
    return next(a for a in recipe.archives if a.file_name == file_name)


# ---------------------------------------------------------------- downloads

class DownloadError(Exception):
    """A download failed; ``locate`` turns it into a DataError with the manual instructions."""


def _open(request: urllib.request.Request, timeout: float, opener=None):
    """The single network call (tests replace it)."""
    return (opener or urllib.request.build_opener()).open(request, timeout=timeout)


def _gdrive_resolve(url: str, timeout: float, opener) -> str:
    """Google Drive answers a large file's link with a 'cannot scan for viruses' page; the file
    itself is behind that page's form (or, in older pages, a ``confirm=`` token / cookie)."""
    with _open(urllib.request.Request(url, headers={"User-Agent": "semibench"}), timeout, opener) as resp:
        ctype = resp.headers.get("Content-Type", "")
        if "text/html" not in ctype:
            return url  # small file: served directly
        html = resp.read(1 << 20).decode("utf-8", errors="replace")
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"', html)
    if form:
        fields = re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', html)
        return form.group(1).replace("&amp;", "&") + "?" + urllib.parse.urlencode(fields)
    token = re.search(r"confirm=([0-9A-Za-z_\-]+)", html)
    if token:
        return url + "&confirm=" + token.group(1)
    for cookie in getattr(opener, "_semibench_jar", []):
        if cookie.name.startswith("download_warning"):
            return url + "&confirm=" + cookie.value
    raise DownloadError("Google Drive did not offer the file (quota exceeded or the link changed)")


def download_file(url: str, dest: Path, expected_sha256: str | None = None,
                  timeout: float = DOWNLOAD_TIMEOUT, kind: str = "http") -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed with Range when the server allows),
    check the sha256, then rename. Network failures raise DownloadError, keeping the .part."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener._semibench_jar = jar
    try:
        if kind == "gdrive":
            url = _gdrive_resolve(url, timeout, opener)
        _fetch(url, part, timeout, opener, dest.name)
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{type(e).__name__}: {reason}") from None
    if expected_sha256:
        got = sha256_file(part)
        if got != expected_sha256.lower():
            part.unlink()
            raise DataError(f"downloaded {dest.name} from {url} has sha256 {got}, expected "
                            f"{expected_sha256}; the partial file was removed, try again")
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float, opener, label: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "semibench"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = _open(urllib.request.Request(url, headers=headers), timeout, opener)
    except urllib.error.HTTPError as e:
        if have and e.code == 416:  # the .part is already complete
            return
        raise
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        if have and status != 206:
            have = 0  # server ignored the Range header: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=label) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"connection closed after {part.stat().st_size} of {total} bytes")


# ---------------------------------------------------------------- parallel work for recipes

def parallel_map(fn: Callable, items: Iterable, workers: int, desc: str, unit: str = "img") -> Iterator:
    """``map(fn, items)`` in order, over ``workers`` processes, with a tqdm bar. At most
    2·workers tasks are in flight, so results never pile up in memory. ``fn`` must be a
    module-level function; a worker's exception propagates and cancels the rest."""
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit=unit)
    try:
        if workers <= 1 or len(items) <= 1:
            for it in items:
                yield fn(it)
                bar.update()
            return
        ex = ProcessPoolExecutor(max_workers=min(workers, len(items)))
        try:
            pending, it = [], iter(items)
            for x in it:
                pending.append(ex.submit(fn, x))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                result = pending.pop(0).result()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append(ex.submit(fn, nxt))
                bar.update()
                yield result
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


_END = object()


# ---------------------------------------------------------------- reading archives

def open_zip(path: str | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from None


_ZIPS: dict[tuple, zipfile.ZipFile] = {}


def cached_zip(path: str | Path) -> zipfile.ZipFile:
    """One open ZipFile per process and path: worker processes must not share a file offset,
    and re-reading a 30,000-entry central directory per task would dominate."""
    st = os.stat(path)
    key = (os.getpid(), str(path), st.st_mtime_ns, st.st_size)  # a replaced file is reopened
    if key not in _ZIPS:
        _ZIPS[key] = open_zip(path)
    return _ZIPS[key]


def clear_zip_cache() -> None:
    for key in [k for k in _ZIPS if k[0] == os.getpid()]:
        _ZIPS.pop(key).close()


def read_member(zf: zipfile.ZipFile, path: str | Path, member: str) -> bytes:
    try:
        return zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
        raise DataError(f"{path}: member {member!r} cannot be read (truncated or corrupt?): {e}") from None


def open_image(data: bytes, path: str | Path, member: str) -> Image.Image:
    """Decode an image member fully (so truncation surfaces here, named)."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError...)
        raise DataError(f"{path}: member {member!r} is not a readable image: {e}") from None


def crc_check_zip(zf: zipfile.ZipFile, path: str | Path) -> None:
    """CRC-check every member."""
    try:
        bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{path}: corrupt zip archive: {e}") from None
    if bad is not None:
        raise DataError(f"{path}: member {bad!r} is corrupt (CRC mismatch)")
