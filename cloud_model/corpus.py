"""Encode many structures to SCOPE strings: in parallel processes, with an on-disk cache per dataset.

:func:`encode_structures` encodes CIF texts or pymatgen structures over a pool of
processes (chunked, results in input order); failures become ``None`` plus a
reason, never an exception for the whole batch. :func:`encode_dataset` encodes a
registry dataset once and keeps the result in
``$CLOUDLAB_CACHE_DIR/scope/<name>-<variant>-<key>.json``, the key being a sha256
of the dataset files' registered hashes, the variant, the tolerances and the
encoder version; SCOPE datasets (``cloud_cv``, ``cloud_pretrain_10k``) return their
stored strings.

Example:
    >>> strings = encode_dataset("perov_5", variant="native")   # id -> SCOPE, cached
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cloud_model.errors import DataError, SymmetryError
from cloud_model.scope import ENCODER_VERSION, Variant, encode_scope, scope_tables
from cloud_model.wyckoff import letter_group

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)
# phase records ("encoding SCOPE done/total") for whoever shows progress (the CLI's live display)
_phase = logging.getLogger("cloudlab.progress")

CACHE_DIR_ENV = "CLOUDLAB_CACHE_DIR"
CACHE_FORMAT = "cloudlab-scope-cache-1"
_Item = tuple[Literal["cif", "json"], str]  # what crosses to a worker: CIF text or Structure JSON


@dataclass
class EncodeResult:
    """Strings in input order (None where encoding failed) and the reason of each failure."""

    strings: list[str | None]
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        """Number of structures encoded."""
        return len(self.strings) - len(self.errors)


@dataclass
class DatasetEncoding:
    """The SCOPE strings of a dataset, what failed, and where the cache file is.

    Attributes:
        strings: record id -> SCOPE string (failures left out).
        errors: record id -> reason (invalid rows and encoding failures).
        cache_path: the cache file (None for SCOPE datasets, which need none).
        from_cache: whether the strings were read from the cache.
    """

    strings: dict[str, str]
    errors: dict[str, str]
    cache_path: Path | None
    from_cache: bool


class ScopeCacheFile(BaseModel):
    """The on-disk cache of one encoded dataset."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["cloudlab-scope-cache-1"] = "cloudlab-scope-cache-1"
    key: str
    dataset: str
    variant: str
    symprec: float
    angle_tolerance: float
    encoder_version: str
    strings: dict[str, str]
    errors: dict[str, str]


def _to_item(obj: Any) -> _Item:
    if isinstance(obj, str):
        return ("cif", obj)
    as_dict = getattr(obj, "as_dict", None)
    if as_dict is None:
        raise TypeError(f"expected CIF text or a pymatgen Structure, got {type(obj).__name__}")
    return ("json", json.dumps(as_dict()))


def _encode_item(item: _Item, variant: Variant, symprec: float, angle_tolerance: float) -> tuple[str | None, str]:
    kind, text = item
    try:
        if kind == "cif":
            from cloud_model.datasets import CrystalRecord

            structure: Any = CrystalRecord("input", "", {}, text, None).structure()
        else:
            from pymatgen.core import Molecule, Structure

            payload = json.loads(text)
            cls = Structure if "lattice" in payload else Molecule
            structure = cls.from_dict(payload)
        return encode_scope(structure, symprec=symprec, angle_tolerance=angle_tolerance, variant=variant), ""
    except (SymmetryError, DataError) as exc:
        return None, str(exc)


def _encode_chunk(
    items: list[_Item], variant: Variant, symprec: float, angle_tolerance: float
) -> list[tuple[str | None, str]]:
    return [_encode_item(item, variant, symprec, angle_tolerance) for item in items]


def default_processes() -> int:
    """CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _pool_context() -> Any:
    """``fork`` where available: workers start in milliseconds, inherit the loaded tables and
    need no ``if __name__ == "__main__"`` guard in scripts (they run only numpy/spglib code);
    ``spawn`` elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def encode_structures(
    cifs_or_structures: Sequence[str | Structure],
    *,
    variant: Variant = "cloud",
    symprec: float = 0.1,
    angle_tolerance: float = 5.0,
    processes: int | None = None,
    chunksize: int | None = None,
) -> EncodeResult:
    """Encode CIF texts and/or structures, in parallel when ``processes > 1``.

    Args:
        cifs_or_structures: CIF texts (``str``) or pymatgen structures.
        variant: SCOPE variant (see :mod:`cloud_model.scope`).
        symprec: spglib distance tolerance in Angstrom.
        angle_tolerance: spglib angle tolerance in degrees.
        processes: worker processes; None -> all usable CPUs; 1 -> in this process.
        chunksize: items per task; default spreads the work in ~4 chunks per worker.

    Returns:
        An :class:`EncodeResult` whose ``strings`` follow the input order; unparsable CIFs
        and structures the encoder rejects are ``None`` with a reason in ``errors``.
    """
    items = [_to_item(obj) for obj in cifs_or_structures]
    n_proc = default_processes() if processes is None else max(1, int(processes))
    n_proc = 1 if len(items) < 8 * n_proc else n_proc  # a pool costs more than it saves on a few items
    if n_proc > 1:
        scope_tables(), letter_group(1)  # load once here so forked workers inherit them
    results: list[tuple[str | None, str]] = []
    if n_proc == 1:
        step = max(1, len(items) // 100)
        for i, item in enumerate(items):
            results.append(_encode_item(item, variant, symprec, angle_tolerance))
            if (i + 1) % step == 0 and len(items) >= 100:
                _encoding_progress(i + 1, len(items))
    else:
        size = chunksize or max(1, min(256, math.ceil(len(items) / (8 * n_proc))))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with ProcessPoolExecutor(max_workers=n_proc, mp_context=_pool_context()) as pool:
            parts = pool.map(_encode_chunk, chunks, *([x] * len(chunks) for x in (variant, symprec, angle_tolerance)))
            for part in parts:  # in order, as each chunk is done
                results.extend(part)
                _encoding_progress(len(results), len(items))
    out = EncodeResult([s for s, _ in results])
    out.errors = {i: why for i, (s, why) in enumerate(results) if s is None}
    if out.errors:
        first = next(iter(out.errors.items()))
        logger.warning("%d of %d structures could not be encoded (first: #%d: %s)",
                       len(out.errors), len(items), first[0], first[1])
    return out


def _encoding_progress(done: int, total: int) -> None:
    _phase.debug("encoding SCOPE %d/%d", done, total,
                 extra={"phase": "encoding SCOPE", "done": done, "total": total})


STRUCTURE_FILE_PATTERNS = ("*.cif", "*.vasp", "POSCAR*", "CONTCAR*", "*.poscar")


def read_structure_file(path: str | Path) -> Structure:
    """Read a CIF, POSCAR/CONTCAR or other pymatgen-readable structure file.

    Raises:
        DataError: the file is missing, unreadable or not a structure file pymatgen can parse.
    """
    import warnings

    from pymatgen.core import Structure

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_file(path)
    except Exception as exc:  # pymatgen raises many types (ValueError, KeyError, IndexError...) on bad files
        raise DataError(f"{path}: cannot read a structure ({type(exc).__name__}: {exc})".strip()) from exc


def structure_files(directory: str | Path) -> list[Path]:
    """Structure files directly in ``directory`` (see :data:`STRUCTURE_FILE_PATTERNS`), sorted by name."""
    directory = Path(directory)
    found = {p for pattern in STRUCTURE_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def scope_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` or ``$CLOUDLAB_CACHE_DIR/scope`` (default ``~/.cache/cloudlab/scope``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "cloudlab")
    return Path(root).expanduser() / "scope"


def cache_key(name: str, variant: Variant, symprec: float, angle_tolerance: float) -> str:
    """sha256 of the dataset files' registered hashes, the encoder settings and versions."""
    from cloud_model.datasets import get_spec
    from cloud_model.wyckoff import NORMALISER_FILE

    spec = get_spec(name)
    h = hashlib.sha256()
    for f in spec.files:
        h.update(f"{f.split}:{f.relpath}:{f.sha256}\n".encode())
    h.update(f"{variant}|{symprec!r}|{angle_tolerance!r}|{ENCODER_VERSION}\n".encode())
    h.update(hashlib.sha256(NORMALISER_FILE.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> ScopeCacheFile | None:
    if not path.is_file():
        return None
    try:
        cached = ScopeCacheFile.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        logger.warning("ignoring unreadable SCOPE cache %s (%s); re-encoding", path, exc)
        return None
    return cached if cached.key == key else None


def _write_cache(path: Path, payload: ScopeCacheFile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(payload.model_dump_json())
    os.replace(tmp, path)


def encode_dataset_full(
    name: str,
    *,
    variant: Variant = "cloud",
    symprec: float = 0.1,
    angle_tolerance: float = 5.0,
    processes: int | None = None,
    cache_dir: str | Path | None = None,
) -> DatasetEncoding:
    """Encode every record of a registry dataset once; later calls read the cache.

    Raises:
        DatasetNotFoundError: unknown dataset.
        DataError: a resource name, a formula dataset (no structures to encode), or
            ``variant="native"`` for a dataset that only has published (cloud-variant) strings.
    """
    from cloud_model.datasets import get_spec, load_dataset

    spec = get_spec(name)
    if spec.kind == "resource":
        raise DataError(f"{name!r} is a resource file, not a dataset of crystals")
    spec.require_structures("SCOPE encoding")
    if spec.kind == "scope":
        if variant != "cloud":
            raise DataError(f"{name!r} holds published CLOUD strings only; it has no {variant!r} variant")
        loaded = load_dataset(name)
        strings = {r.id: r.scope for r in loaded.records if r.scope is not None}
        return DatasetEncoding(strings, dict(loaded.invalid), None, False)
    key = cache_key(name, variant, symprec, angle_tolerance)
    path = scope_cache_dir(cache_dir) / f"{name}-{variant}-{key[:16]}.json"
    cached = _read_cache(path, key)
    if cached is not None:
        logger.info("SCOPE strings of %s (%s) read from %s", name, variant, path)
        return DatasetEncoding(cached.strings, cached.errors, path, True)
    loaded = load_dataset(name)
    records = [r for r in loaded.records if r.cif is not None]
    result = encode_structures([r.cif for r in records if r.cif is not None], variant=variant,
                               symprec=symprec, angle_tolerance=angle_tolerance, processes=processes)
    strings = {r.id: s for r, s in zip(records, result.strings, strict=True) if s is not None}
    errors = dict(loaded.invalid) | {records[i].id: why for i, why in result.errors.items()}
    if errors:
        logger.warning("%s: %d of %d records not encoded (first: %s)", name, len(errors),
                       len(records) + len(loaded.invalid), next(iter(errors.items())))
    _write_cache(path, ScopeCacheFile(key=key, dataset=name, variant=variant, symprec=symprec,
                                      angle_tolerance=angle_tolerance, encoder_version=ENCODER_VERSION,
                                      strings=strings, errors=errors))
    logger.info("encoded %s (%s): %d strings, cached in %s", name, variant, len(strings), path)
    return DatasetEncoding(strings, errors, path, False)


def encode_dataset(
    name: str,
    *,
    variant: Variant = "cloud",
    symprec: float = 0.1,
    angle_tolerance: float = 5.0,
    processes: int | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, str]:
    """Record id -> SCOPE string for a registry dataset (cached; failures logged, see :func:`encode_dataset_full`)."""
    return encode_dataset_full(name, variant=variant, symprec=symprec, angle_tolerance=angle_tolerance,
                               processes=processes, cache_dir=cache_dir).strings
