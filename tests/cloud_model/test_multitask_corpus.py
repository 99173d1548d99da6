"""The multi-task corpus on real data: zero pool overlap, composition strings, options, old checkpoints."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import pytest
import torch

from cloud_model.composition import composition_scope, is_composition_scope, parse_formula
from cloud_model.errors import ConfigError, DataError
from cloud_model.leakage import (
    GUARD_REASONS,
    PoolIndex,
    RowKeys,
    build_pool_index,
    structure_row_keys,
)
from cloud_model.multitask_corpus import (
    MultiTaskDataOptions,
    build_multitask_corpus,
    corpus_tokenizer,
)
from cloud_model.multitask_data import MultiTaskCorpus
from cloud_model.pretrain_corpus import in_validation
from cloud_model.scope import encode_scope
from cloud_model.tokenizer import (
    LATEST_VOCAB_VERSION,
    STRUCTURE_VOCAB_VERSION,
    VOCAB_VERSION,
    ScopeTokenizer,
)

CRABNET_DIR = "crabnet"


def _perov_and_cloud_cv_pools() -> PoolIndex:
    """perov_5 val+test by id and formula (its formula column: no encoding needed), cloud_cv test."""
    from cloud_model.datasets import load_dataset

    index = PoolIndex()
    for split in ("val", "test"):
        rows = [
            RowKeys(r.id, formula=parse_formula(r.extra["formula"])[0])
            for r in load_dataset("perov_5", [split]).records
        ]
        index.add(f"perov_5:{split}", rows)
    index.add("cloud_cv:test", structure_row_keys("cloud_cv", ["test"]))
    return index


def _assert_no_overlap(
    corpus: MultiTaskCorpus, kept: dict[str, list[tuple[RowKeys, str]]], index: PoolIndex
) -> None:
    """Every kept row clears every pool by id, structure and formula, and the tasks hold exactly them."""
    for dataset, rows in kept.items():
        assert index.overlaps(k for k, _ in rows) == dict.fromkeys(GUARD_REASONS, 0), dataset
        assert all(k.formula is not None for k, _ in rows), dataset
        assert corpus.guard.kept[dataset] == len(rows)
        strings = {s for _, s in rows}
        for task in corpus.tasks:
            if task.name.split(":")[0] == dataset:
                task_strings = {s for s, _ in task.train + task.validation}
                assert task_strings <= strings, task.name
                assert len(task_strings) > 0.5 * len(strings), task.name


def test_fast_real_subset_has_zero_pool_overlap() -> None:
    pools = {"perov_5": ["val", "test"], "cloud_cv": ["test"]}
    options = MultiTaskDataOptions(
        structure_sources={"cloud_cv": ["train_and_val"]},
        formula_sources=["crabnet_expt_gap", "crabnet_mp_bulk_modulus"],
        pools=pools,
        mlm_datasets=["cloud_cv", "cloud_pretrain_10k"],
        mlm_compositions=True,
    )
    index = _perov_and_cloud_cv_pools()
    kept: dict[str, list[tuple[RowKeys, str]]] = {}
    corpus = build_multitask_corpus(options, kept_rows=kept, pool_index=index)
    _assert_no_overlap(corpus, kept, index)
    names = [t.name for t in corpus.tasks]
    assert names == [
        "cloud_cv:cv",
        "crabnet_expt_gap:band_gap",
        "crabnet_mp_bulk_modulus:bulk_modulus",
    ]
    cv, gap, bulk = corpus.tasks
    assert (cv.unit, gap.unit, bulk.unit) == ("J/(mol K)", "eV", "GPa")
    assert not cv.composition_only and gap.composition_only and bulk.composition_only
    assert all(is_composition_scope(s) for s, _ in gap.train + gap.validation)
    assert not any(is_composition_scope(s) for s, _ in cv.train)
    # perovskite formulas are in the experimental band gaps; the guard removed them
    removed = corpus.guard.removed
    assert removed["crabnet_expt_gap"]["formula"] > 20
    assert removed["cloud_cv"]["formula"] > 20  # cloud_cv test shares compositions with train
    assert corpus.guard.pools == ["perov_5:val", "perov_5:test", "cloud_cv:test"]
    # the split is the fixed string-hash rule, for tasks and MLM alike
    for task in corpus.tasks:
        assert all(not in_validation(s, 0.05) for s, _ in task.train)
        assert all(in_validation(s, 0.05) for s, _ in task.validation)
        assert 0.02 < len(task.validation) / (len(task.train) + len(task.validation)) < 0.09
        assert all(math.isfinite(v) for _, v in task.train + task.validation)
        assert len({s for s, _ in task.train}) == len(task.train)  # duplicates: "mean"
    mlm_train, mlm_validation = set(corpus.mlm_train), set(corpus.mlm_validation)
    assert not mlm_train & mlm_validation and len(mlm_train) == len(corpus.mlm_train)
    assert all(in_validation(s, 0.05) for s in mlm_validation)
    # unlabelled strings are not guarded: the cloud_cv test crystals (a pool) are in MLM
    from cloud_model.datasets import load_dataset

    pool_strings = {r.scope for r in load_dataset("cloud_cv", ["test"]).records}
    assert pool_strings <= mlm_train | mlm_validation
    assert any(is_composition_scope(s) for s in mlm_train)  # mlm_compositions
    tokenizer = corpus_tokenizer()
    assert tokenizer.version == LATEST_VOCAB_VERSION
    assert sum(tokenizer.count_unknown(s) for s, _ in gap.train + bulk.train + cv.train) == 0


def test_duplicate_strings_of_a_task_are_averaged_or_kept() -> None:
    """matbench log10 G_VRH has one row per structure: polymorphs give one composition string."""
    base = {
        "structure_sources": {},
        "formula_sources": ["crabnet_log10_gvrh"],
        "pools": {"cloud_cv": ["test"]},
        "mlm_datasets": ["cloud_cv"],
    }
    index = build_pool_index({"cloud_cv": ["test"]})
    mean = build_multitask_corpus(MultiTaskDataOptions(**base), pool_index=index).tasks[0]
    keep = build_multitask_corpus(
        MultiTaskDataOptions(**base, duplicates="keep"), pool_index=index
    ).tasks[0]
    assert mean.name == keep.name == "crabnet_log10_gvrh:log10_shear_modulus"
    rows_kept = keep.train + keep.validation
    rows_mean = dict(mean.train + mean.validation)
    assert len(rows_kept) > len(rows_mean) == len({s for s, _ in rows_kept})
    by_string: dict[str, list[float]] = {}
    for s, v in rows_kept:
        by_string.setdefault(s, []).append(v)
    repeated = [s for s, vs in by_string.items() if len(vs) > 1]
    assert len(repeated) > 50
    for s in repeated[:50]:
        assert rows_mean[s] == pytest.approx(sum(by_string[s]) / len(by_string[s]))


def test_bad_options_name_the_problem() -> None:
    def build(**kwargs: object) -> None:
        build_multitask_corpus(MultiTaskDataOptions(**kwargs))  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="unknown dataset 'perov_6'"):
        build(structure_sources={"perov_6": "all"})
    with pytest.raises(ConfigError, match=r"'perov_5' split\(s\) \['test', 'val'\].*excluded pool"):
        build(structure_sources={"perov_5": "all"})
    with pytest.raises(ConfigError, match=r"'mpts_52' split\(s\) \['test'\]"):
        build(structure_sources={"mpts_52": ["val", "test"]})
    with pytest.raises(ConfigError, match="formula set.*formula_sources"):
        build(structure_sources={"crabnet_expt_gap": "all"})
    with pytest.raises(ConfigError, match="'mp_20_pilot' has no split"):
        build(structure_sources={"mp_20_pilot": ["training"]})
    with pytest.raises(ConfigError, match="'crabnet_expt_gap' has no target.*'gap'"):
        build(formula_sources=["crabnet_expt_gap"], targets={"crabnet_expt_gap": ["gap"]})
    with pytest.raises(ConfigError, match="'aflow_bulk_modulus' is not a labelled source"):
        build(structure_sources={}, targets={"aflow_bulk_modulus": ["bulk_modulus"]})
    with pytest.raises(ConfigError, match="mlm_datasets.*'crabnet_mp_gap'"):
        build(mlm_datasets=["crabnet_mp_gap"])
    with pytest.raises(ConfigError, match="labelled sources without targets.*cloud_pretrain_10k"):
        build(structure_sources={"cloud_pretrain_10k": "all"})
    with pytest.raises(ValueError, match="extra"):
        MultiTaskDataOptions(datasets=["x"])  # type: ignore[call-arg]


def test_a_task_the_guard_empties_is_a_data_error() -> None:
    from cloud_model.datasets import load_dataset

    index = PoolIndex()
    every_formula = [
        RowKeys(f"planted:{i}", formula=parse_formula(r.formula or "")[0])
        for i, r in enumerate(load_dataset("crabnet_mp_shear_modulus").records)
    ]
    index.add("planted:test", every_formula)
    options = MultiTaskDataOptions(
        structure_sources={}, formula_sources=["crabnet_mp_shear_modulus"],
        pools={"cloud_cv": ["test"]}, mlm_datasets=["cloud_cv"],
    )  # fmt: skip
    with pytest.raises(
        DataError, match="task 'crabnet_mp_shear_modulus:shear_modulus' has no rows"
    ):
        build_multitask_corpus(options, pool_index=index)


def test_builder_reports_planted_pool_rows_under_their_reason() -> None:
    """Real rows of a formula set and of cloud_cv, planted into a pool by id, formula or string."""
    from cloud_model.datasets import load_dataset

    gap = load_dataset("crabnet_expt_gap").records
    train = structure_row_keys("cloud_cv", ["train_and_val"])
    index = PoolIndex()
    index.add("planted:test", [
        RowKeys(gap[0].id),  # same id
        RowKeys("elsewhere:1", formula=parse_formula(gap[1].formula or "")[0]),  # same formula
        RowKeys("elsewhere:2", cloud=train[5].cloud),  # same published crystal, no formula
    ])  # fmt: skip
    options = MultiTaskDataOptions(
        structure_sources={"cloud_cv": ["train_and_val"]}, formula_sources=["crabnet_expt_gap"],
        pools={"cloud_cv": ["test"]}, mlm_datasets=["cloud_cv"],
    )  # fmt: skip
    formula_1 = parse_formula(gap[1].formula or "")[0]
    same_formula = sum(parse_formula(r.formula or "")[0] == formula_1 for r in gap)
    corpus = build_multitask_corpus(options, pool_index=index)
    assert corpus.guard.removed["crabnet_expt_gap"] == {"id": 1, "formula": same_formula}
    assert corpus.guard.removed["cloud_cv"]["structure"] >= 1
    assert corpus.guard.kept["crabnet_expt_gap"] == len(gap) - 1 - same_formula


def _crabnet_formulas(data_dir: Path, limit: int | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted((data_dir / CRABNET_DIR).rglob("*.csv")):
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [row["formula"] for row in itertools.islice(csv.DictReader(fh), limit)]
        out[str(path.relative_to(data_dir))] = rows
    return out


def _assert_compositions_tokenize(files: dict[str, list[str]]) -> None:
    tokenizer = ScopeTokenizer.latest()
    assert len(files) == 27  # 13 sets: 5 single files, 6 x 3 splits, 2 x 2 splits
    for name, formulas in files.items():
        unknown = bad = 0
        for formula in formulas:
            try:
                text = composition_scope(formula)
            except DataError:
                bad += 1
                continue
            unknown += tokenizer.count_unknown(text)
        assert unknown == 0, name
        assert bad <= 0.001 * len(formulas), name


def test_composition_strings_tokenize_without_unknowns_sample(data_dir: Path) -> None:
    """The first 1,000 formulas of every crabnet file (the slow test reads them all)."""
    _assert_compositions_tokenize(_crabnet_formulas(data_dir, 1000))
    text = composition_scope("Sr(AlH)2")
    assert text == "[NOSYM] | [NOWYCK] | Sr 0.2 Al 0.4 H 0.4"
    assert ScopeTokenizer.latest().decode(ScopeTokenizer.latest().encode(text)) == text
    # part 3 is what the encoder writes for a crystal of that formula
    from pymatgen.core import Lattice, Structure

    salt = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    assert encode_scope(salt).split(" | ")[2] == composition_scope("Cl4Na4").split(" | ")[2]
    with pytest.raises(DataError, match="not elements"):
        composition_scope("Xx2O")
    with pytest.raises(DataError, match="does not parse"):
        composition_scope("Na((Cl")


@pytest.mark.slow
def test_every_crabnet_composition_string_tokenizes_without_unknowns(data_dir: Path) -> None:
    _assert_compositions_tokenize(_crabnet_formulas(data_dir, None))


def test_old_checkpoint_still_loads_and_encodes(tmp_path: Path) -> None:
    """A scope-vocab-1 checkpoint (the retired cloud-small's vocabulary) keeps its ids."""
    from cloud_model.checkpoint import DataSummary, ModelCard, load_checkpoint, save_checkpoint
    from cloud_model.heads import MaskedLMHeadConfig, build_model
    from cloud_model.model import CloudConfig

    old = ScopeTokenizer.for_version(STRUCTURE_VOCAB_VERSION)
    torch.manual_seed(0)
    summary = DataSummary(datasets={"mp_20": 1}, n_train=1, n_validation=0)
    built = build_model(CloudConfig.named("tiny", old.vocab_size), MaskedLMHeadConfig()).eval()
    save_checkpoint(tmp_path / "v1", built, old, ModelCard(size="tiny", data=summary))
    model, tokenizer, card = load_checkpoint(tmp_path / "v1")
    assert tokenizer.version == STRUCTURE_VOCAB_VERSION == card.tokenizer.version  # type: ignore[union-attr]
    assert tokenizer.vocab_size == model.encoder.config.vocab_size == 443
    latest = ScopeTokenizer.latest()
    assert ScopeTokenizer.default().version == VOCAB_VERSION == LATEST_VOCAB_VERSION
    assert latest.vocab_size == 445 and latest.tokens[:443] == tokenizer.tokens  # no id moved
    structure = "1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0 | 4a 4b | Na 0.5 Cl 0.5"
    assert latest.encode(structure) == tokenizer.encode(structure)
    composition = composition_scope("NaCl")
    assert tokenizer.count_unknown(composition) == 2 and latest.count_unknown(composition) == 0
    batch = tokenizer.batch_encode([structure, composition])
    with torch.no_grad():
        hidden = model.encoder(batch.ids, batch.mask)
    assert hidden.shape[0] == 2 and torch.isfinite(hidden).all()
    # a new checkpoint carries scope-vocab-2 and loads with it
    fresh = build_model(CloudConfig.named("tiny", latest.vocab_size), MaskedLMHeadConfig()).eval()
    save_checkpoint(tmp_path / "v2", fresh, latest, ModelCard(size="tiny", data=summary))
    _, loaded, new_card = load_checkpoint(tmp_path / "v2")
    assert loaded.version == LATEST_VOCAB_VERSION and loaded.tokens == latest.tokens
    assert new_card.tokenizer is not None and new_card.tokenizer.vocab_size == 445


@pytest.mark.slow
def test_full_corpus_has_zero_pool_overlap() -> None:
    """The issue's "guard overlap = 0" test: the default corpus against the default pools."""
    options = MultiTaskDataOptions(processes=2)
    index = build_pool_index(options.pools, processes=2)
    kept: dict[str, list[tuple[RowKeys, str]]] = {}
    corpus = build_multitask_corpus(options, kept_rows=kept, pool_index=index)
    _assert_no_overlap(corpus, kept, index)
    assert len(kept) == 8 + 13  # structure sources and every crabnet set
    assert len(corpus.tasks) == 3 + 3 + 2 + 4 + 1 + 13
    assert len(index.natives) > 15_000 and not index.no_formula
    report = corpus.guard
    assert report.removed["mpts_52"]["formula"] > 100  # the time split shares compositions
    assert all("unknown_tokens" not in r for r in report.removed.values())
