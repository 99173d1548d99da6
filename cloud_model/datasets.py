"""Offline-first dataset registry: resolve, verify and load the project's datasets.

Every dataset of ``../shared/data/SOURCES.md`` is registered by name in
:data:`REGISTRY` (the table itself is :mod:`cloud_model.registry_data`) with its
files, public URLs, sha256, targets (with units), licence and citation. CIF and
SCOPE sets give records with a structure; formula sets (``crabnet_*``) give records
with a chemical formula (:attr:`CrystalRecord.formula`) and targets only.

A file is resolved in this order, and its sha256 is checked wherever it comes from:

1. the mirror ``$CLOUDLAB_DATA_DIR/<relpath>``; when the variable is unset, the
   ``shared/data`` folder beside the checkout (``../shared/data`` seen from the
   repository) if it exists; ``CLOUDLAB_DATA_DIR=`` (empty) turns the mirror off;
2. the user cache ``$CLOUDLAB_CACHE_DIR/data/<relpath>`` (default ``~/.cache/cloudlab``);
3. a download into the cache from the file's URL, or from ``$CLOUDLAB_DATA_URL/<relpath>``
   when that variable names another server laid out like the mirror.

A hash mismatch is a :class:`~cloud_model.errors.DataError`; a download that fails
its check is deleted, never left in the cache.

Example:
    >>> result = load_dataset("perov_5", ["val"])
    >>> record = result.records[0]
    >>> record.targets["heat_ref"], record.structure().composition.reduced_formula
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cloud_model.errors import DataError
from cloud_model.registry_data import (
    REGISTRY,
    DatasetFile,
    DatasetKind,
    DatasetSpec,
    TargetSpec,
    get_spec,
)

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = [
    "CACHE_DIR_ENV", "DATA_DIR_ENV", "DATA_URL_ENV", "REGISTRY", "CrystalRecord", "DatasetFile",
    "DatasetKind", "DatasetSpec", "FileLocation", "LoadResult", "TargetSpec", "cache_dir", "file_url",
    "get_spec", "load_dataset", "locate", "mirror_dir", "read_csv", "resolve", "resource_path",
    "sha256_of",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "CLOUDLAB_DATA_DIR"
CACHE_DIR_ENV = "CLOUDLAB_CACHE_DIR"
DATA_URL_ENV = "CLOUDLAB_DATA_URL"

FileSource = Literal["mirror", "cache", "missing"]
# progress(file, bytes_done, bytes_total or None), called while a file downloads
ProgressCallback = Callable[["DatasetFile", int, "int | None"], None]


# ---------------------------------------------------------------- locations and hashes


_BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data"


def mirror_dir() -> Path | None:
    """The offline mirror: ``$CLOUDLAB_DATA_DIR``, else ``../shared/data`` beside the checkout.

    Returns None when the variable is set but empty (mirror off) or when it is unset
    and no ``shared/data`` folder sits beside the repository.
    """
    value = os.environ.get(DATA_DIR_ENV)
    if value is not None:
        return Path(value).expanduser() if value else None
    return _BESIDE_CHECKOUT if _BESIDE_CHECKOUT.is_dir() else None


def cache_dir() -> Path:
    """Where downloaded files live: ``$CLOUDLAB_CACHE_DIR/data`` (default ``~/.cache/cloudlab/data``)."""
    root = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "cloudlab")
    return Path(root).expanduser() / "data"


def file_url(f: DatasetFile) -> str:
    """The URL a file downloads from: ``$CLOUDLAB_DATA_URL/<relpath>`` if set, else its public URL."""
    base = os.environ.get(DATA_URL_ENV)
    return f"{base.rstrip('/')}/{f.relpath}" if base else f.url


@dataclass(frozen=True)
class FileLocation:
    """Where a file would resolve from now, without hashing or downloading."""

    file: DatasetFile
    path: Path | None
    source: FileSource


def locate(name: str) -> list[FileLocation]:
    """Where each file of ``name`` currently lives (mirror, cache or missing); no I/O beyond stat."""
    spec = get_spec(name)
    mirror, cache = mirror_dir(), cache_dir()
    out = []
    for f in spec.files:
        if mirror is not None and (mirror / f.relpath).is_file():
            out.append(FileLocation(f, mirror / f.relpath, "mirror"))
        elif (cache / f.relpath).is_file():
            out.append(FileLocation(f, cache / f.relpath, "cache"))
        else:
            out.append(FileLocation(f, None, "missing"))
    return out


_HASHES: dict[tuple[str, int, int, int, int], str] = {}  # (path, inode, size, mtime, ctime) -> sha256


def sha256_of(path: Path) -> str:
    """The sha256 hex digest of a file, memoised on (path, inode, size, mtime, ctime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = _HASHES[key] = h.hexdigest()
    return digest


def _mismatch(spec: DatasetSpec, f: DatasetFile, where: str, actual: str, todo: str) -> DataError:
    return DataError(
        f"dataset {spec.name!r}, file {f.relpath} ({where}): sha256 {actual} does not match the "
        f"registered {f.sha256}; {todo}"
    )


def _download(spec: DatasetSpec, f: DatasetFile, dest: Path, progress: ProgressCallback | None) -> Path:
    """Stream ``f`` into ``dest`` through a temporary file, hashing on the fly."""
    import httpx

    url = file_url(f)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    logger.info("downloading %s (%s) from %s", f.relpath, spec.name, url)
    try:
        digest, done = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as resp:
            if resp.status_code != 200:
                raise DataError(
                    f"dataset {spec.name!r}, file {f.relpath}: GET {url} returned HTTP {resp.status_code}; "
                    f"check the URL or set {DATA_DIR_ENV} to a mirror that has the file"
                )
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            next_log = 0.25
            for chunk in resp.iter_bytes(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(f, done, total)
                if total and done / total >= next_log:
                    logger.info("%s: %d%% of %d bytes", f.relpath, int(100 * done / total), total)
                    next_log += 0.25
        actual = digest.hexdigest()
        if actual != f.sha256:
            raise _mismatch(spec, f, f"downloaded from {url}", actual,
                            "the download was deleted; the source changed or the transfer was corrupted, "
                            "retry or fetch the file from a trusted mirror")
        os.replace(tmp, dest)
    except httpx.HTTPError as exc:
        raise DataError(
            f"dataset {spec.name!r}, file {f.relpath}: download from {url} failed ({exc}); "
            f"check the network or set {DATA_DIR_ENV} to an offline mirror"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("downloaded %s (%d bytes, sha256 verified) to %s", f.relpath, done, dest)
    return dest


_WARNED: set[Path] = set()  # mirrors already reported missing


def _resolve_file(spec: DatasetSpec, f: DatasetFile, *, download: bool, progress: ProgressCallback | None) -> Path:
    mirror = mirror_dir()
    if mirror is not None:
        path = mirror / f.relpath
        if path.is_file():
            actual = sha256_of(path)
            if actual != f.sha256:
                raise _mismatch(spec, f, f"mirror {mirror}", actual,
                                "the mirror is corrupt or out of date: restore the file, or unset "
                                f"{DATA_DIR_ENV} to download it into the cache")
            return path
        if not mirror.is_dir() and mirror not in _WARNED:
            _WARNED.add(mirror)
            logger.warning("%s=%s is not a directory; using the cache and downloads", DATA_DIR_ENV, mirror)
        logger.debug("%s not in mirror %s; trying the cache", f.relpath, mirror)
    cached = cache_dir() / f.relpath
    if cached.is_file():
        actual = sha256_of(cached)
        if actual == f.sha256:
            return cached
        if not download:
            raise _mismatch(spec, f, f"cache {cached}", actual,
                            f"run `cloudlab data fetch {spec.name}` to download it again")
        logger.warning("cached %s has sha256 %s, expected %s; downloading again", cached, actual, f.sha256)
        cached.unlink()
    if not download:
        where = f"mirror {mirror} nor " if mirror is not None else f"mirror ({DATA_DIR_ENV} unset) nor "
        raise DataError(
            f"dataset {spec.name!r}, file {f.relpath} is in neither the {where}the cache {cache_dir()}; "
            f"run `cloudlab data fetch {spec.name}` or set {DATA_DIR_ENV} to the offline mirror"
        )
    return _download(spec, f, cached, progress)


def resolve(name: str, *, download: bool = True, progress: ProgressCallback | None = None) -> dict[str, Path]:
    """Local, sha256-verified paths of every file of ``name``.

    Args:
        name: registered dataset name.
        download: fetch files missing from the mirror and the cache; if False, a missing
            file is a :class:`DataError`.
        progress: optional callback ``(file, bytes_done, bytes_total)`` for download progress.

    Returns:
        split -> local path (in the mirror or the user cache).

    Raises:
        DatasetNotFoundError: unknown name.
        DataError: a file is missing (without download), fails its hash or cannot be downloaded.
    """
    spec = get_spec(name)
    return {f.split: _resolve_file(spec, f, download=download, progress=progress) for f in spec.files}


def resource_path(name: str) -> Path:
    """Local path of a single-file resource (e.g. ``cloud_generators``), resolved like :func:`resolve`."""
    spec = get_spec(name)
    if spec.kind != "resource" or len(spec.files) != 1:
        raise DataError(f"{name!r} is a {spec.kind} dataset, not a single-file resource; use load_dataset")
    return resolve(name)[spec.files[0].split]


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class CrystalRecord:
    """One row of a dataset.

    Attributes:
        id: from the dataset's id column, or ``f"{name}:{split}:{row}"``.
        split: the split the row comes from.
        targets: target name -> value in the unit of its :class:`TargetSpec`; NaN when empty.
        cif: the P1 CIF text (CIF sets), else None.
        scope: the published-format SCOPE string (SCOPE sets), else None.
        formula: the chemical formula as the file writes it, not reduced (formula sets,
            which have no structure; parse it with pymatgen ``Composition``), else None.
            CIF sets that list a formula keep it in ``extra["formula"]``.
        extra: other useful columns, typed (``formula``, ``year``, ``n_atoms``,
            ``spacegroup.number``, ``elements``...); None where empty.
    """

    id: str
    split: str
    targets: dict[str, float]
    cif: str | None
    scope: str | None
    formula: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # the dict fields are unhashable; ids are unique per dataset
        return hash((self.id, self.split))

    def structure(self) -> Structure:
        """The pymatgen Structure parsed from :attr:`cif`; :class:`DataError` if none or invalid."""
        if self.cif is None:
            what = "a formula record, no structure" if self.formula is not None else "a SCOPE-string record"
            raise DataError(f"record {self.id!r} has no CIF (it is {what})")
        structure, problem = _parse_cif(self.cif)
        if structure is None:
            raise DataError(f"record {self.id!r}: {problem}")
        return structure


@dataclass
class LoadResult:
    """Valid records, and the rows that were left out with the reason why."""

    records: list[CrystalRecord]
    invalid: list[tuple[str, str]]  # (id, reason)


def _parse_cif(cif: str) -> tuple[Structure | None, str]:
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(cif, fmt="cif")
    except Exception as exc:  # pymatgen raises many types (ValueError, KeyError, IndexError...) on bad CIFs
        return None, f"CIF does not parse: {type(exc).__name__}: {exc}".strip()
    if len(structure) == 0:
        return None, "CIF has no sites"
    return structure, ""


def _formula_problem(text: str) -> str | None:
    """Why ``text`` is not a usable chemical formula, or None (pymatgen ``Composition``)."""
    from pymatgen.core import Composition, Element

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            composition = Composition(text)
    except Exception as exc:  # pymatgen raises ValueError, KeyError... on bad formulas
        return f"formula does not parse: {type(exc).__name__}: {exc}".strip()
    unknown = [getattr(s, "symbol", str(s)) for s in composition if not isinstance(s, Element)]
    if unknown:
        return f"formula {text[:60]!r} has symbols that are not elements: {unknown}"
    if composition.num_atoms <= 0:
        return f"formula has no atoms: {text[:60]!r}"
    return None


def _scope_problem(text: str) -> str | None:
    parts = text.split(" | ")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        return f"SCOPE string does not have three non-empty ' | '-separated parts: {text[:60]!r}"
    return None


def _parse_elements(raw: str) -> tuple[str, ...]:
    return tuple(s.strip().strip("'\"") for s in raw.strip().strip("[]").split(",") if s.strip())


_EXTRA_KEYS = {"pretty_formula": "formula"}  # column -> key in CrystalRecord.extra
_EXTRA_PARSERS: dict[str, Callable[[str], Any]] = {
    "year": int,
    "spacegroup.number": int,
    "n_atoms": lambda raw: int(float(raw)),
    "heat_all": float,
    "theoretical": lambda raw: {"true": True, "false": False}[raw.strip().lower()],
    "elements": _parse_elements,
}


def _open_text(path: Path) -> Any:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return path.open(newline="", encoding="utf-8")


def read_csv(
    spec: DatasetSpec, split: str, path: Path, *, validate: bool = False, seen: set[str] | None = None
) -> LoadResult:
    """Parse one CSV (optionally gzipped) of ``spec`` into records.

    Rows with an empty id, structure (formula) or duplicate id, a non-numeric target or a
    malformed extra column go to ``invalid``; with ``validate`` every CIF is parsed by pymatgen
    (every SCOPE string checked for its three parts, every formula parsed as a pymatgen
    ``Composition``) and failures go there too. ``seen`` carries the ids
    of earlier splits so that ids stay unique across a whole dataset (it is updated).
    """
    csv.field_size_limit(1 << 26)
    records: list[CrystalRecord] = []
    invalid: list[tuple[str, str]] = []
    seen = set() if seen is None else seen
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        needed = [spec.structure_column, spec.formula_column, spec.id_column,
                  *(t.column for t in spec.targets.values()), *spec.extra_columns]
        absent = [c for c in needed if c is not None and c not in (reader.fieldnames or ())]
        if absent:
            raise DataError(f"dataset {spec.name!r}, {path}: missing columns {absent}; "
                            f"found {reader.fieldnames}")
        for row_idx, row in enumerate(reader):
            fallback = f"{spec.name}:{split}:{row_idx}"
            rid = fallback if spec.id_column is None else spec.id_prefix + (row[spec.id_column] or "")
            problem = _row_problem(spec, row, rid, seen)
            if problem is None:
                try:
                    record = _make_record(spec, split, rid, row, validate)
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                invalid.append((rid or fallback, problem))
                continue
            seen.add(rid)
            records.append(record)
    if invalid:
        logger.warning("%s/%s: %d invalid rows left out (first: %s)", spec.name, split, len(invalid),
                       ", ".join(i for i, _ in invalid[:5]))
    return LoadResult(records, invalid)


def _row_problem(spec: DatasetSpec, row: dict[str | Any, Any], rid: str, seen: set[str]) -> str | None:
    if None in row or any(v is None for v in row.values()):
        return "row does not have the same number of fields as the header"
    if spec.id_column is not None and rid == spec.id_prefix:
        return f"empty id column {spec.id_column!r}"
    if rid in seen:
        return "duplicate id"
    for column in (spec.structure_column, spec.formula_column):
        if column is not None and not row[column].strip():
            return f"empty {column!r} column"
    return None


def _make_record(spec: DatasetSpec, split: str, rid: str, row: dict[str, str], validate: bool) -> CrystalRecord:
    """Build one record; ValueError (with the reason) if the row is invalid."""
    targets: dict[str, float] = {}
    for name, target in spec.targets.items():
        raw = row[target.column].strip()
        try:
            targets[name] = float(raw) if raw else math.nan
        except ValueError:
            raise ValueError(f"target {name!r} is not a number: {raw[:40]!r}") from None
    extra: dict[str, Any] = {}
    for column in spec.extra_columns:
        raw = row[column].strip()
        try:
            extra[_EXTRA_KEYS.get(column, column)] = _EXTRA_PARSERS.get(column, str)(raw) if raw else None
        except (ValueError, KeyError):
            raise ValueError(f"column {column!r} is malformed: {raw[:40]!r}") from None
    if spec.formula_column is not None:  # a formula set: no structure
        formula = row[spec.formula_column].strip()
        problem = _formula_problem(formula) if validate else None
        if problem:
            raise ValueError(problem)
        return CrystalRecord(id=rid, split=split, targets=targets, cif=None, scope=None,
                             formula=formula, extra=extra)
    text = row[spec.structure_column] if spec.structure_column else None
    is_cif = spec.structure_column == "cif"
    if validate and text is not None:
        problem = _parse_cif(text)[1] if is_cif else _scope_problem(text)
        if problem:
            raise ValueError(problem)
    return CrystalRecord(id=rid, split=split, targets=targets, cif=text if is_cif else None,
                         scope=None if is_cif else text, extra=extra)


_LOADED: dict[tuple[str, tuple[str, ...], bool, tuple[Path, ...]], LoadResult] = {}


def load_dataset(name: str, splits: Sequence[str] | None = None, *, validate: bool = False) -> LoadResult:
    """Load typed records of a CIF, SCOPE or formula dataset, resolving (and if needed downloading) its files.

    Args:
        name: registered dataset name (not a resource).
        splits: which splits, in this order; None -> all, in registry order.
        validate: parse every CIF (formula) with pymatgen (slow: milliseconds per CIF) and
            report failures in ``invalid``; without it only cheap checks run (empty/duplicate
            ids, empty structures or formulas, non-numeric targets).

    Returns:
        A :class:`LoadResult`; results are cached in-process per (name, splits, validate, files),
        and each call returns fresh lists.

    Raises:
        DatasetNotFoundError: unknown name.
        DataError: a resource name, an unknown split, a missing column or an unresolvable file.
    """
    spec = get_spec(name)
    if spec.kind == "resource":
        raise DataError(f"{name!r} is a resource file, not a table; use resource_path({name!r})")
    chosen = spec.splits if splits is None else (splits,) if isinstance(splits, str) else tuple(splits)
    files = [spec.file(s) for s in chosen]
    paths = tuple(_resolve_file(spec, f, download=True, progress=None) for f in files)
    key = (name, chosen, validate, paths)
    result = _LOADED.get(key)
    if result is None:
        records: list[CrystalRecord] = []
        invalid: list[tuple[str, str]] = []
        seen: set[str] = set()
        for split, path in zip(chosen, paths, strict=True):
            part = read_csv(spec, split, path, validate=validate, seen=seen)
            records += part.records
            invalid += part.invalid
        result = _LOADED[key] = LoadResult(records, invalid)
        logger.debug("loaded %s %s: %d records, %d invalid", name, chosen, len(records), len(invalid))
    return LoadResult(list(result.records), list(result.invalid))
