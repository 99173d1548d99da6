"""``cloudlab scope``: encode crystals as SCOPE strings.

``cloudlab scope encode PATH_OR_DATASET`` accepts a structure file (CIF, POSCAR...),
a directory of them, or a registered dataset name (encoded once, then read from
the cache). Thin wrapper over :mod:`cloud_model.corpus` and :mod:`cloud_model.scope`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console

scope_app = typer.Typer(
    help="SCOPE strings: encode structure files or registered datasets.", no_args_is_help=True
)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    return console if console.is_terminal else Console(stderr=stderr, highlight=False, width=400)


def _encode_paths(
    target: Path, variant: str, symprec: float, angle_tolerance: float, processes: int | None
) -> tuple[dict[str, str], dict[str, str]]:
    from cloud_model.corpus import encode_structures, read_structure_file, structure_files
    from cloud_model.errors import DataError

    files = structure_files(target) if target.is_dir() else [target]
    if not files:
        raise DataError(
            f"{target}: no structure files (*.cif, *.vasp, POSCAR*, CONTCAR*) in this directory"
        )
    structures, names, errors = [], [], {}
    for path in files:
        name = path.name if target.is_dir() else str(path)
        try:
            structures.append(read_structure_file(path))
            names.append(name)
        except DataError as exc:
            if not target.is_dir():
                raise
            errors[name] = str(exc)
    with _console(stderr=True).status(f"encoding {len(structures)} structures..."):
        result = encode_structures(
            structures,
            variant=variant,  # type: ignore[arg-type]
            symprec=symprec,
            angle_tolerance=angle_tolerance,
            processes=processes,
        )
    if not target.is_dir() and result.errors:
        from cloud_model.errors import SymmetryError

        raise SymmetryError(f"{target}: {result.errors[0]}")
    strings = {n: s for n, s in zip(names, result.strings, strict=True) if s is not None}
    errors |= {names[i]: why for i, why in result.errors.items()}
    return strings, errors


@scope_app.command("encode")
def encode(
    target: str = typer.Argument(
        ..., help="A CIF/POSCAR file, a directory of them, or a registered dataset name."
    ),
    variant: str = typer.Option(
        "cloud", "--variant", help="'cloud' (published grammar) or 'native'."
    ),
    symprec: float = typer.Option(0.1, "--symprec", help="spglib distance tolerance, Angstrom."),
    angle_tolerance: float = typer.Option(
        5.0, "--angle-tolerance", help="spglib angle tolerance, degrees."
    ),
    processes: int | None = typer.Option(
        None, "--processes", "-j", help="Worker processes (default: all CPUs)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write a CSV (id, scope) instead of printing."
    ),
) -> None:
    """Encode structures as SCOPE strings and print them (or save them as CSV)."""
    from cloud_model.corpus import encode_dataset_full
    from cloud_model.errors import DataError
    from cloud_model.scope import VARIANTS

    if variant not in VARIANTS:
        raise typer.BadParameter(f"choose one of {', '.join(VARIANTS)}", param_hint="--variant")
    path = Path(target).expanduser()
    if path.exists():
        strings, errors = _encode_paths(path, variant, symprec, angle_tolerance, processes)
    elif "/" in target or path.suffix:
        raise DataError(f"{target}: no such file or directory")
    else:
        with _console(stderr=True).status(
            f"encoding dataset {target} (cached after the first time)..."
        ):
            encoded = encode_dataset_full(
                target,
                variant=variant,
                symprec=symprec,  # type: ignore[arg-type]
                angle_tolerance=angle_tolerance,
                processes=processes,
            )
        strings, errors = encoded.strings, encoded.errors
        if encoded.cache_path is not None:
            where = "read from" if encoded.from_cache else "cached in"
            _console(stderr=True).print(f"{where} {encoded.cache_path}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "scope"])
            writer.writerows(strings.items())
        _console(stderr=True).print(f"wrote {len(strings)} SCOPE strings to {out}")
    else:
        console = _console()
        for key, text in strings.items():
            console.print(f"[bold]{key}[/bold]\t{text}", soft_wrap=True)
    if errors:
        err = _console(stderr=True)
        err.print(
            f"[yellow]{len(errors)} not encoded[/yellow] (first: {next(iter(errors.items()))})"
        )


def register(app: typer.Typer) -> None:
    """Attach the ``scope`` command group to the root app."""
    app.add_typer(scope_app, name="scope")
