"""What is registered: the spec models and the table of datasets (files, sha256, URLs, targets).

Re-exported by :mod:`cloud_model.datasets`, which resolves and loads the files. Hashes
are those of the offline mirror (``../shared/data/SHA256SUMS``); URLs follow
``https://raw.githubusercontent.com/OWNER/REPO/COMMIT/PATH`` with the commits named in
``../shared/data/SOURCES.md`` (``main`` where it names none; the CLOUD commit for every
CLOUD file).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud_model.errors import DataError, DatasetNotFoundError

DatasetKind = Literal["cif", "scope", "resource"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetSpec(_Frozen):
    """One labelled property: its CSV column, physical unit and meaning."""

    column: str
    unit: str
    description: str


class DatasetFile(_Frozen):
    """One file of a dataset (usually one split)."""

    split: str
    relpath: str = Field(description="path relative to the mirror root, e.g. 'cdvae/perov_5/val.csv'")
    url: str = Field(description="canonical public URL")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DatasetSpec(_Frozen):
    """A registered dataset: files, columns, targets, provenance."""

    name: str
    description: str
    kind: DatasetKind
    files: tuple[DatasetFile, ...]
    id_column: str | None = Field(description="None -> ids are f'{name}:{split}:{row}'")
    id_prefix: str = Field(default="", description="prepended to values of id_column")
    structure_column: str | None = Field(description="'cif' for CIF sets, 'cloud' for SCOPE sets")
    targets: dict[str, TargetSpec]
    extra_columns: tuple[str, ...]
    licence: str
    citation: str

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names in registry order."""
        return tuple(f.split for f in self.files)

    def file(self, split: str) -> DatasetFile:
        """The file of one split; :class:`DataError` if the dataset has no such split."""
        for f in self.files:
            if f.split == split:
                return f
        raise DataError(f"dataset {self.name!r} has no split {split!r}; its splits are {list(self.splits)}")


_RAW = "https://raw.githubusercontent.com"
# (owner/repo, commit) of each canonical source
_CDVAE = ("txie-93/cdvae", "main")
_WT = ("SymmetryAdvantage/WyckoffTransformer", "main")
_WT_PILOT = ("SymmetryAdvantage/WyckoffTransformer", "85bd47b3")
_WT_AFLOW = ("SymmetryAdvantage/WyckoffTransformer", "1b7d0d13")
_CLOUD = ("ChangwenXu98/CLOUD", "043de9e")

_CITE_CDVAE = (
    "Xie, T., Fu, X., Ganea, O.-E., Barzilay, R., Jaakkola, T. Crystal Diffusion Variational "
    "Autoencoder for Periodic Material Generation. ICLR 2022."
)
_CITE_MP = (
    "Jain, A. et al. Commentary: The Materials Project: A materials genome approach to "
    "accelerating materials innovation. APL Materials 1, 011002 (2013)."
)
_CITE_WT = "Kazeev, N. et al. Wyckoff Transformer: Generation of Symmetric Crystals. ICML 2025."
_CITE_AFLOW = (
    "Toher, C. et al. High-throughput computational screening of thermal conductivity, Debye "
    "temperature, and Grueneisen parameter using a quasiharmonic Debye model. Phys. Rev. B 90, "
    "174107 (2014); Toher, C. et al. Combining the AFLOW GIBBS and elastic libraries to "
    "efficiently and robustly screen thermomechanical properties of solids. Phys. Rev. "
    "Materials 1, 015401 (2017)."
)
_CITE_CLOUD = (
    "Xu, C., Zhu, S., Viswanathan, V. CLOUD: A Scalable and Physics-Informed Foundation Model "
    "for Crystal Representation Learning. arXiv:2506.17345 (2025)."
)
_LIC_MP = "Apache-2.0 (WyckoffTransformer repo); Materials Project data CC-BY-4.0"

_MP_EXTRA = ("pretty_formula", "elements", "spacegroup.number")


def _file(split: str, relpath: str, source: tuple[str, str], src_path: str, sha256: str) -> dict[str, str]:
    repo, commit = source
    return {
        "split": split,
        "relpath": relpath,
        "url": f"{_RAW}/{repo}/{commit}/{src_path}",
        "sha256": sha256,
    }


def _target(column: str, unit: str, description: str) -> dict[str, str]:
    return {"column": column, "unit": unit, "description": description}


_AFLOW_HASHES: dict[str, tuple[str, str, str]] = {  # task -> (train, val, test)
    "debye_temperature": (
        "726c9bc244a2ac992ae9637dfda247e9c5b9a4d6cedfb3e96f99bce31fbf5d1b",
        "e1c5d2f33c521ec66f0406b2861ec7cbd283f6414247b3d9746a43b55555c9d1",
        "bae7e403a83eda9a48624f9825fd0403dfce5f2e4795bbd6118faaf4a19cbda3",
    ),
    "bulk_modulus": (
        "57ff2e370d555f31be5e4c9d0d89ac8c879c165ffbf118e27649e940dd1f8abe",
        "e158c4f3810e14317a80f10ea3b348f12410399fe4942a2440f09a63153a2f75",
        "dd3544d6285018a1bb28098d032be95bd2a21aeab76abf316cacf14f80bb25fe",
    ),
    "shear_modulus": (
        "5d20bbde467f84ea2aee3b4de97f0dc3fa835b7a6098801364cca0ed2d1c15ea",
        "caae0448dc2db1566a1955d585f301a25675a55bbd050a4274c3f4da79b0525b",
        "08aafe7c79444397cd6c21d811e625136ceee41f74d66b2607fd83f0bb78f218",
    ),
    "thermal_expansion": (
        "726f0aef6c0f2ca42145198e8feecd5e2b598c9e9cafc8ac750e0007886318be",
        "b08805d9574ac728eb66b589358ea14eab5620111d7a774fbcd5702b14f5e2b1",
        "5acf0730108bccf28be6bb089b956f378666ebef5ff90e2c7be968858a610cc2",
    ),
}
_AFLOW_TARGETS: dict[str, tuple[str, str]] = {  # task -> (unit, description)
    "debye_temperature": ("K", "Debye temperature from AEL-AGL (quasi-harmonic Debye model)"),
    "bulk_modulus": ("GPa", "Voigt-Reuss-Hill bulk modulus from AEL-AGL"),
    "shear_modulus": ("GPa", "Voigt-Reuss-Hill shear modulus from AEL-AGL"),
    "thermal_expansion": ("1/K", "volumetric thermal expansion coefficient at 300 K from AEL-AGL"),
}


def _aflow_spec(task: str) -> dict[str, Any]:
    unit, description = _AFLOW_TARGETS[task]
    files = [
        _file(split, f"aflow/{task}/{split}.csv.gz", _WT_AFLOW, f"data/aflow/{task}/{split}.csv.gz", sha)
        for split, sha in zip(("train", "val", "test"), _AFLOW_HASHES[task], strict=True)
    ]
    return {
        "name": f"aflow_{task}",
        "description": f"AFLOW AEL-AGL {task.replace('_', ' ')} of ~4,900 inorganic crystals "
        "(WyckoffTransformer split; the same structures and split for all four AFLOW tasks)",
        "kind": "cif",
        "files": files,
        # the unnamed index column is the structure's row in the AFLOW table, shared by all four tasks
        "id_column": "",
        "id_prefix": "aflow-",
        "structure_column": "cif",
        "targets": {task: _target(task, unit, description)},
        "extra_columns": (),
        "licence": "AFLOW data (cite Toher et al. 2014/2017); WyckoffTransformer repo Apache-2.0",
        "citation": f"{_CITE_AFLOW} {_CITE_WT}",
    }


SPECS: list[dict[str, Any]] = [
    {
        "name": "perov_5",
        "description": "Castelli cubic perovskites (5-atom cells), CDVAE val/test split (7,572 of 18,928)",
        "kind": "cif",
        "files": [
            _file("val", "cdvae/perov_5/val.csv", _CDVAE, "data/perov_5/val.csv",
                  "326f401219901270374b71e2faff63df3a29a99fd26f469993b9f476b693daf2"),
            _file("test", "cdvae/perov_5/test.csv", _CDVAE, "data/perov_5/test.csv",
                  "a85878c685037f0a578257f6d4fcdde00e968dbab73c5f1e90ecef65218513f6"),
        ],
        "id_column": "material_id",
        "structure_column": "cif",
        "targets": {
            "heat_ref": _target("heat_ref", "eV", "heat of formation of the 5-atom cell (reference energies)"),
            "dir_gap": _target("dir_gap", "eV", "direct band gap (GLLB-SC)"),
            "ind_gap": _target("ind_gap", "eV", "indirect band gap (GLLB-SC)"),
        },
        "extra_columns": ("formula", "heat_all"),
        "licence": "MIT (CDVAE repo); data from the Computational Materials Repository",
        "citation": "Castelli, I. E. et al. New cubic perovskites for one- and two-photon water "
        "splitting using the computational materials repository. Energy Environ. Sci. 5, 9034 "
        f"(2012). {_CITE_CDVAE}",
    },
    {
        "name": "carbon_24",
        "description": "AIRSS carbon structures at 10 GPa (6-24 atoms), CDVAE val/test split (4,062 of 10,153)",
        "kind": "cif",
        "files": [
            _file("val", "cdvae/carbon_24/val.csv", _CDVAE, "data/carbon_24/val.csv",
                  "36c00689cd63073c954a58bc6ed6e2adb7aeed5a630c994970959a1babffd50e"),
            _file("test", "cdvae/carbon_24/test.csv", _CDVAE, "data/carbon_24/test.csv",
                  "386b17c08816f434818d51e46687bf72ff3f92348f3ba24823e4758f1fe8a969"),
        ],
        "id_column": "material_id",
        "structure_column": "cif",
        "targets": {
            "energy_per_atom": _target("energy_per_atom", "eV/atom", "AIRSS total energy per atom at 10 GPa"),
        },
        "extra_columns": (),
        "licence": "MIT (CDVAE repo)",
        "citation": "Pickard, C. J. AIRSS data for carbon at 10GPa and the C+N+H+O system at 1GPa. "
        f"Materials Cloud Archive 2020.0026/v1 (2020). {_CITE_CDVAE}",
    },
    {
        "name": "mp_20_biternary",
        "description": "binary and ternary crystals of the MP-20 val/test splits (Materials Project, "
        "<= 20 atoms, e_above_hull <= 0.08 eV/atom)",
        "kind": "cif",
        "files": [
            _file("val", "mp/mp_20_biternary/val.csv.gz", _WT, "data/mp_20_biternary/val.csv.gz",
                  "f0a1743241ade50592ce24dd3efc8b5e4d4d84c6a72e827c16699e83ce254f07"),
            _file("test", "mp/mp_20_biternary/test.csv.gz", _WT, "data/mp_20_biternary/test.csv.gz",
                  "e96144ffbad7fc61b0012456ead22d2c8f6993282a4fef584fbf906581086e02"),
        ],
        "id_column": "material_id",
        "structure_column": "cif",
        "targets": {
            "formation_energy_per_atom": _target("formation_energy_per_atom", "eV/atom", "DFT formation energy per atom"),
            "band_gap": _target("band_gap", "eV", "DFT (PBE) band gap"),
            "e_above_hull": _target("e_above_hull", "eV/atom", "energy above the convex hull"),
        },
        "extra_columns": _MP_EXTRA,
        "licence": _LIC_MP,
        "citation": f"{_CITE_MP} {_CITE_CDVAE} {_CITE_WT}",
    },
    {
        "name": "mp_20_pilot",
        "description": "1,000-row pilot subsets of the MP-20 train/val/test splits (Materials Project)",
        "kind": "cif",
        "files": [
            _file(split, f"mp/mp_20_pilot/{split}.csv.gz", _WT_PILOT, f"data/mp_20_pilot/{split}.csv.gz", sha)
            for split, sha in (
                ("train", "a89a708d16d80401fe256d6742680f2e02ed5746f1a685cfea1b509754fe728e"),
                ("val", "b03d4aeb363a7ec3018cea66e2e69fce3ca3b518c900531a03a1266d5d392eb6"),
                ("test", "c0b5922164322338d0e282d4429b2dc8ab31ffa39d456d05e102b6ec88ea7262"),
            )
        ],
        "id_column": "material_id",
        "structure_column": "cif",
        "targets": {
            "formation_energy_per_atom": _target("formation_energy_per_atom", "eV/atom", "DFT formation energy per atom"),
            "band_gap": _target("band_gap", "eV", "DFT (PBE) band gap"),
            "e_above_hull": _target("e_above_hull", "eV/atom", "energy above the convex hull"),
        },
        "extra_columns": _MP_EXTRA,
        "licence": _LIC_MP,
        "citation": f"{_CITE_MP} {_CITE_CDVAE} {_CITE_WT}",
    },
    {
        "name": "mpts_52",
        "description": "Materials Project time split (<= 52 atoms; val/test by year of first publication)",
        "kind": "cif",
        "files": [
            _file("val", "mp/mpts_52/val.csv.gz", _WT, "data/mpts_52/val.csv.gz",
                  "af56fcaa2ed7f36e9ec0ce95ae409c73f4c909644153c3d441c76f87a4d1c11d"),
            _file("test", "mp/mpts_52/test.csv.gz", _WT, "data/mpts_52/test.csv.gz",
                  "5c082d8cd8b5398bb9971f076e2f459771e01b45b1a2d206f665bd99a1369feb"),
        ],
        "id_column": "material_id",
        "structure_column": "cif",
        "targets": {
            "formation_energy_per_atom": _target("formation_energy_per_atom", "eV/atom", "DFT formation energy per atom"),
            "energy_above_hull": _target("energy_above_hull", "eV/atom", "energy above the convex hull"),
        },
        "extra_columns": ("year", "theoretical"),
        "licence": _LIC_MP,
        "citation": "Baird, S. G. et al. matbench-genmetrics. JOSS 9, 5618 (2024); Jiao, R. et al. "
        f"Crystal Structure Prediction by Joint Equivariant Diffusion. NeurIPS 2023. {_CITE_MP} {_CITE_WT}",
    },
    *(_aflow_spec(task) for task in _AFLOW_HASHES),
    {
        "name": "cloud_cv",
        "description": "CLOUD-DEBYE heat-capacity benchmark: published-format SCOPE strings with Cv at 300 K",
        "kind": "scope",
        "files": [
            _file("train_and_val", "cloud/cloud_cv_train_and_val.csv", _CLOUD, "example_data/cloud_cv_train_and_val.csv",
                  "a86ce0aedb5ca621d55818e80c50e88c11cf59afab9b501c38b04dbb56fb802b"),
            _file("test", "cloud/cloud_cv_test.csv", _CLOUD, "example_data/cloud_cv_test.csv",
                  "972e5dfc876232883b8d7129550fd44e612d3ba454dd3c1961ab3fe3049d8c54"),
        ],
        "id_column": None,
        "structure_column": "cloud",
        "targets": {
            "cv": _target("cv", "J/(mol K)", "phonon heat capacity at 300 K per mole of cells"),
        },
        "extra_columns": ("n_atoms",),
        "licence": "MIT (CLOUD repo, cloud/LICENSE)",
        "citation": _CITE_CLOUD,
    },
    {
        "name": "cloud_pretrain_10k",
        "description": "10,000 unlabelled published-format SCOPE strings of OPTIMADE crystals (CLOUD pretraining sample)",
        "kind": "scope",
        "files": [
            _file("train", "cloud/pretrain_cloud_10k.csv", _CLOUD, "example_data/pretrain_cloud_10k.csv",
                  "35e7afcf01b4c3f03ed87c456159bf55971ed61538db405d1bba92ac35133cc3"),
        ],
        "id_column": None,
        "structure_column": "cloud",
        "targets": {},
        "extra_columns": (),
        "licence": "MIT (CLOUD repo, cloud/LICENSE)",
        "citation": _CITE_CLOUD,
    },
    {
        "name": "cloud_generators",
        "description": "space-group number -> encoded generator string (Shmueli encoding) of the published SCOPE format",
        "kind": "resource",
        "files": [
            _file("file", "cloud/generator.json", _CLOUD, "data/generator.json",
                  "c4b463d5f9c168f2bac8df209707803519128773f0bc44989611eb0a4b6fdbf1"),
        ],
        "id_column": None,
        "structure_column": None,
        "targets": {},
        "extra_columns": (),
        "licence": "MIT (CLOUD repo, cloud/LICENSE)",
        "citation": _CITE_CLOUD,
    },
    {
        "name": "cloud_wyckoff_multiplicities",
        "description": "space-group number -> Wyckoff letter -> multiplicity in the conventional cell",
        "kind": "resource",
        "files": [
            _file("file", "cloud/wyckoff-position-multiplicities.json", _CLOUD,
                  "data/wyckoff-position-multiplicities.json",
                  "eacec03a06a2cbb0a300650920d8ac5a60611b80610d607bfc701d3807f8f061"),
        ],
        "id_column": None,
        "structure_column": None,
        "targets": {},
        "extra_columns": (),
        "licence": "MIT (CLOUD repo, cloud/LICENSE)",
        "citation": _CITE_CLOUD,
    },
    {
        "name": "cloud_licence",
        "description": "the MIT licence of the CLOUD repository, which covers every cloud_* file",
        "kind": "resource",
        "files": [
            _file("file", "cloud/LICENSE", _CLOUD, "LICENSE",
                  "d97797ffb99cb33370ca091d0c26b0c650e92f52af788f4047e1405e900735b7"),
        ],
        "id_column": None,
        "structure_column": None,
        "targets": {},
        "extra_columns": (),
        "licence": "MIT",
        "citation": _CITE_CLOUD,
    },
]


REGISTRY: dict[str, DatasetSpec] = {spec["name"]: DatasetSpec.model_validate(spec) for spec in SPECS}


def get_spec(name: str) -> DatasetSpec:
    """The registered spec of ``name``.

    Raises:
        DatasetNotFoundError: ``name`` is not registered; the message names close matches.
    """
    spec = REGISTRY.get(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name, REGISTRY, n=4, cutoff=0.5)
    close += [n for n in REGISTRY if name and name.lower() in n and n not in close]
    hint = f"did you mean {', '.join(close[:4])}? " if close else ""
    raise DatasetNotFoundError(
        f"unknown dataset {name!r}; {hint}(`cloudlab data list` shows all {len(REGISTRY)})"
    )
