"""``cloudlab generate``: new candidates from hits (substitution, CHGNet relaxation, hull).

Thin wrapper over :func:`loop.generate.generate_candidates`. The input is a directory of
structure files or a campaign directory (its best ``--best`` measured candidates); the
output directory receives ``pool.csv`` (a campaign pool: ``pool: {file: .../pool.csv,
structure_format: cif}``) and ``summary.json`` (counts by stage and rejection reason,
seconds per stage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    source: Path = typer.Argument(..., help="Directory of CIF/POSCAR files, or a campaign dir."),
    out: Path = typer.Option(Path("generated"), "--out", "-o", help="Output directory."),
    best: int = typer.Option(10, min=1, help="Campaign input: its best N measured candidates."),
    threshold: float = typer.Option(1e-3, help="Minimum substitution probability."),
    max_per_parent: int = typer.Option(50, min=1, help="Most probable substitutions per parent."),
    max_candidates: int | None = typer.Option(None, min=1, help="Most probable kept overall."),
    relax_steps: int = typer.Option(100, min=1, help="CHGNet relaxation steps (FIRE)."),
    fmax: float = typer.Option(0.1, min=0.0, help="Relaxation force threshold, eV/A."),
    no_relax: bool = typer.Option(False, "--no-relax", help="Static CHGNet energies only."),
    min_distance: float = typer.Option(0.7, min=0.0, help="Closest allowed atom pair, A."),
    symprec: float = typer.Option(0.1, min=0.0, help="spglib tolerance, A."),
    hull_dataset: str | None = typer.Option(
        "mp_20_biternary", help="Registry CIF set of competing phases; 'none' to skip the hull."
    ),
    cache_dir: Path = typer.Option(
        Path(".cloudlab/generate"), help="CHGNet energy cache (keyed by structure hash)."
    ),
    symmetry_elements: str | None = typer.Option(
        None, help="Also run the symmetry-first generator over these elements, e.g. Li,Mg,Al,O."
    ),
    require: str = typer.Option("", help="Symmetry generator: elements every product contains."),
    n_symmetry: int = typer.Option(100, min=1, help="Symmetry generator: structures built."),
    no_substitution: bool = typer.Option(
        False, "--no-substitution", help="Symmetry generator only (the source is not read)."
    ),
) -> None:
    """Substitute into hits (and/or build symmetry-first structures), relax with CHGNet, check,
    deduplicate, SCOPE-encode, hull."""
    from rich.console import Console

    from loop.generate import EnergyConfig, GenerateConfig, generate_candidates, write_pool_csv
    from loop.generate.checks import CheckConfig
    from loop.generate.parents import parents_from_campaign, parents_from_directory
    from loop.generate.substitution import SubstitutionConfig
    from loop.generate.symmetry import SymmetryConfig
    from loop.store import STORE_FILENAME

    t0 = time.perf_counter()
    if no_substitution:
        parents = []
    elif (source / STORE_FILENAME).exists():
        parents = parents_from_campaign(source, best)
    else:
        parents = parents_from_directory(source)
    symmetry = None
    if symmetry_elements:
        symmetry = SymmetryConfig(
            elements=[e.strip() for e in symmetry_elements.split(",") if e.strip()],
            require=[e.strip() for e in require.split(",") if e.strip()],
            n_proposals=n_symmetry,
            cache_dir=cache_dir,
        )
    config = GenerateConfig(
        substitution=None
        if no_substitution
        else SubstitutionConfig(threshold=threshold, max_per_parent=max_per_parent),
        symmetry=symmetry,
        checks=CheckConfig(min_distance_a=min_distance, symprec=symprec),
        energies=EnergyConfig(
            relax=not no_relax, max_relax_steps=relax_steps, fmax_ev_per_a=fmax, cache_dir=cache_dir
        ),
        hull_dataset=None if (hull_dataset or "none").lower() == "none" else hull_dataset,
        max_candidates=max_candidates,
    )
    console = Console(stderr=True)
    with console.status(f"generating from {len(parents)} parents..."):
        result = generate_candidates(parents, config)
    out.mkdir(parents=True, exist_ok=True)
    write_pool_csv(out / "pool.csv", result.candidates)
    summary = result.summary.model_dump(mode="json")
    summary["input"] = str(source)
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    summary["config"] = config.model_dump(mode="json")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    counts = ", ".join(f"{k} {v}" for k, v in result.summary.counts.items())
    rejected = ", ".join(f"{k} {v}" for k, v in result.summary.rejected.items()) or "none"
    typer.echo(f"{counts}; rejected: {rejected}; {summary['total_s']} s")
    typer.echo(f"wrote {out / 'pool.csv'} and {out / 'summary.json'}")
