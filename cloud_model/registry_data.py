"""What is registered: the spec models and the table of datasets (files, sha256, URLs, targets).

Re-exported by :mod:`cloud_model.datasets`, which resolves and loads the files. Hashes
are those of the offline mirror (``../shared/data/SHA256SUMS``); URLs follow
``https://raw.githubusercontent.com/OWNER/REPO/COMMIT/PATH`` with the commits named in
``../shared/data/SOURCES.md`` (``main`` where it names none; the CLOUD commit for every
CLOUD file), percent-encoded where the upstream path needs it (CrabNet's
``elasticity_log10(G_VRH).csv``).

Kinds: ``cif`` and ``scope`` sets hold structures (a CIF text or a SCOPE string per
row); ``formula`` sets (the CrabNet composition-only label sets) hold a chemical
formula and targets per row and no structure; a ``resource`` is a single file
(a lookup table, a licence) read with ``resource_path``.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_model.errors import DataError, DatasetNotFoundError

# cif / scope: one structure per row; formula: one chemical formula per row, no structure
DatasetKind = Literal["cif", "scope", "formula", "resource"]


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
    structure_column: str | None = Field(
        description="'cif' for CIF sets, 'cloud' for SCOPE sets, None for formula sets and resources"
    )
    formula_column: str | None = Field(
        default=None, description="the formula column of formula sets ('formula'); None otherwise"
    )
    targets: dict[str, TargetSpec]
    extra_columns: tuple[str, ...]
    licence: str
    citation: str

    @model_validator(mode="after")
    def _formula_sets_have_formulas_only(self) -> DatasetSpec:
        if (self.kind == "formula") != (self.formula_column is not None):
            raise ValueError(f"dataset {self.name!r}: formula_column is set exactly for formula sets")
        if self.kind == "formula" and self.structure_column is not None:
            raise ValueError(f"dataset {self.name!r}: a formula set has no structure_column")
        return self

    def require_structures(self, needed_by: str) -> None:
        """Refuse a formula set where structures are needed.

        Args:
            needed_by: what needs them, for the message (e.g. "SCOPE encoding").

        Raises:
            DataError: the dataset is a formula set.
        """
        if self.kind == "formula":
            raise DataError(
                f"dataset {self.name!r} has formulas only, no structures; {needed_by} needs a "
                "CIF or SCOPE dataset (read formula sets with load_dataset: records carry "
                ".formula and .targets)"
            )

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
        "url": f"{_RAW}/{repo}/{commit}/{quote(src_path)}",  # '(' -> %28, ')' -> %29
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


# ---------------------------------------------------------------- CrabNet composition-only sets

_CRABNET = ("anthony-wang/CrabNet", "457b4d4835737ecbe4dd33e53174bd818bd82143")
_CITE_CRABNET = (
    "Wang, A. Y.-T., Kauwe, S. K., Murdock, R. J., Sparks, T. D. Compositionally restricted "
    "attention-based network for materials property predictions. npj Comput. Mater. 7, 77 (2021)."
)
_CITE_MATBENCH = (
    "Dunn, A., Wang, Q., Ganose, A., Dopp, D., Jain, A. Benchmarking materials property prediction "
    "methods: the Matbench test set and Automatminer reference algorithm. npj Comput. Mater. 6, "
    "138 (2020)."
)
_CITE_MP_ELASTIC = (
    "de Jong, M. et al. Charting the complete elastic properties of inorganic crystalline "
    "compounds. Sci. Data 2, 150009 (2015)."
)
_CITE_EXPT_GAP = (
    "Zhuo, Y., Mansouri Tehrani, A., Brgoch, J. Predicting the band gaps of inorganic solids by "
    "machine learning. J. Phys. Chem. Lett. 9, 1668 (2018)."
)
_CITE_AFLOW_DB = (
    "Curtarolo, S. et al. AFLOW: An automatic framework for high-throughput materials discovery. "
    "Comput. Mater. Sci. 58, 218 (2012)."
)
_CITE_OQMD = (
    "Saal, J. E., Kirklin, S., Aykol, M., Meredig, B., Wolverton, C. Materials design and discovery "
    "with high-throughput density functional theory: the Open Quantum Materials Database (OQMD). "
    "JOM 65, 1501 (2013); Kirklin, S. et al. The Open Quantum Materials Database (OQMD): assessing "
    "the accuracy of DFT formation energies. npj Comput. Mater. 1, 15010 (2015)."
)
_LIC_CRABNET = "MIT (CrabNet repo, crabnet/LICENSE.md)"
_ORIGINS: dict[str, tuple[str, str]] = {  # origin -> (data licence note, citation of the source)
    "mp": ("Materials Project data CC-BY-4.0", f"{_CITE_MP} {_CITE_MATBENCH}"),
    "mp_elastic": ("Materials Project data CC-BY-4.0", f"{_CITE_MP_ELASTIC} {_CITE_MP} {_CITE_MATBENCH}"),
    "expt_gap": ("experimental data of Zhuo et al. 2018", f"{_CITE_EXPT_GAP} {_CITE_MATBENCH}"),
    "mp_bench": ("Materials Project data CC-BY-4.0", _CITE_MP),
    "mp_elastic_bench": ("Materials Project data CC-BY-4.0", f"{_CITE_MP_ELASTIC} {_CITE_MP}"),
    "aflow": ("AFLOW data (cite Curtarolo et al. 2012)", _CITE_AFLOW_DB),
    "oqmd": ("OQMD data (cite Saal et al. 2013, Kirklin et al. 2015)", _CITE_OQMD),
}
_SplitHashes = dict[str, str]  # split -> sha256
# name -> (upstream path under data/, mirror path under crabnet/, sha256 of one file, or of each
#          split's file in that folder); a one-file set has the single split "train"
_CRABNET_FILES: dict[str, tuple[str, str, str | _SplitHashes]] = {
    "mp_e_form": ("matbench/mp_e_form.csv", "matbench/mp_e_form.csv",
                  "90e895635c96447c5be4e9070d26f26e1b4d17925102a6597ae3c4d79c32555b"),
    "mp_gap": ("matbench/mp_gap.csv", "matbench/mp_gap.csv",
               "4084e584467e6f81ec8bf12c438eeb2c049ae39e11401bae694ef6a9983b9d9f"),
    "expt_gap": ("matbench/expt_gap.csv", "matbench/expt_gap.csv",
                 "3de82c37f1db3ab9bbd92366c96633f131913ded5db0969eb36216bdd11cef2f"),
    "log10_gvrh": ("matbench/elasticity_log10(G_VRH).csv", "matbench/log10_gvrh.csv",
                   "6eda504f98a3b98308bb4f1353810f2703475daa85540b15aebe1fedf313304a"),
    "log10_kvrh": ("matbench/elasticity_log10(K_VRH).csv", "matbench/log10_kvrh.csv",
                   "b4e2620ca797b9eca83a6633d4b94dc3ae047bba3f0eacd5cdb446a75d07d087"),
    "mp_e_hull": ("benchmark_data/mp_e_hull", "mp_e_hull", {
        "train": "b3badcdc96484d4ae7c622bf098e75db628a23e89c48b44b0b0af8084e9bb7ae",
        "val": "fbeba63de5701a2e300c52f5192673cbd7737e3b762f2d9a2d2056b982d7fe41",
        "test": "236e6fe8f6406ef28a6805d26e508be0b4d45da1d22aebe779c93d3291c599a0"}),
    "mp_bulk_modulus": ("benchmark_data/mp_bulk_modulus", "mp_bulk_modulus", {
        "train": "00d2d02073ca945d357f834eb5a2d7361e8bd8b86f14f8fed2321db585baf731",
        "val": "fd0702d7e1b32f109c8dbc89cbbce6f541fe6bad0fb45cc86d2a35ab4e994906",
        "test": "f205ffa36b5ce2eaf1f066e7b6d2a6931f7bcd233697456dbcbae4c79f911a44"}),
    "mp_shear_modulus": ("benchmark_data/mp_shear_modulus", "mp_shear_modulus", {
        "train": "22f18b123f6d4c1b180c96ee56a0618c35f868e1cb9f9bd758180330b5e95cdf",
        "val": "094b720096cc4d451535d2a227c8186904069d4d7566cb82aebc9c3d777c8036",
        "test": "7ee01a44644916c3df8d1e42212fc4d9be5028b67d51754becb477e72c048317"}),
    "aflow_egap": ("benchmark_data/aflow__Egap", "aflow_egap", {
        "train": "54cfdde0f9dc313acf2ffb22f49c9861d8d0e1fc5ee3938b8810785db65c1c17",
        "val": "798bd5b2d16cca829be8873a483872910de4c948a1bc55ae89c70efb9be0c545",
        "test": "d2096c4b87dcc1f13407532f048552544cd389d49486770b9b065dffd5cc92ef"}),
    "aflow_energy_atom": ("benchmark_data/aflow__energy_atom", "aflow_energy_atom", {
        "train": "5ff635bff649b9a68e5cf572125bf4f527751fd49b98d680fb1182a1ca275ad5",
        "val": "ce5c8f7b3175c9c370891c5e29bdf1e0c5e56c103f391f0a538c629ef319b81a",
        "test": "f393d89ac7a506b2415645b9ee4e69e2d15af1469ece679e945f7098d51a6e99"}),
    "oqmd_bandgap": ("benchmark_data/OQMD_Bandgap", "oqmd_bandgap", {
        "train": "8611a9f1f76ad06d846890d2234e6b37909abd941c156cdc339447bbcce3ada7",
        "val": "7838750eb3b5b09ec296b0fbf194271f6588b4bcd4653e392aba6df04c645002",
        "test": "59206d9cf13387a6cbf5a155f5b350043aee2f190663bb9baf97a6ee85e63d55"}),
    "oqmd_formation_enthalpy": ("benchmark_data/OQMD_Formation_Enthalpy", "oqmd_formation_enthalpy", {
        "val": "af138c2bfed3a8eb8fc2e202690fae94190e0e64258625ce1612df45298193d4",
        "test": "773275807866c98cef1d36887e2f33cf3a3bb0428fc8faf6912cdcff19961172"}),
    "oqmd_volume_per_atom": ("benchmark_data/OQMD_Volume_per_atom", "oqmd_volume_per_atom", {
        "val": "ca3c843b42a8628d330c3bed198fce1de012ce544d1f5bf4c6a93ef7e9e0224d",
        "test": "5b20ae50b3d28408ab87d153012b58a5eb4fb926392c836a094eac47c6dc2cef"}),
}
# name -> (target name, unit, meaning, origin key of _ORIGINS, what the set is)
_CRABNET_TARGETS: dict[str, tuple[str, str, str, str, str]] = {
    "mp_e_form": ("formation_energy_per_atom", "eV/atom", "DFT (PBE) formation energy per atom",
                  "mp", "Materials Project formation energies (matbench_mp_e_form), one row per "
                  "structure: polymorphs share a formula"),
    "mp_gap": ("band_gap", "eV", "DFT (PBE) band gap", "mp",
               "Materials Project band gaps (matbench_mp_gap), one row per structure: polymorphs "
               "share a formula"),
    "expt_gap": ("band_gap", "eV", "experimentally measured band gap", "expt_gap",
                 "experimental band gaps of inorganic solids (matbench_expt_gap, Zhuo et al. 2018)"),
    "log10_gvrh": ("log10_shear_modulus", "log10(GPa)",
                   "base-10 logarithm of the Voigt-Reuss-Hill shear modulus in GPa (DFT elastic tensor)",
                   "mp_elastic", "Materials Project shear moduli (matbench_log_gvrh), one row per "
                   "structure: polymorphs share a formula"),
    "log10_kvrh": ("log10_bulk_modulus", "log10(GPa)",
                   "base-10 logarithm of the Voigt-Reuss-Hill bulk modulus in GPa (DFT elastic tensor)",
                   "mp_elastic", "Materials Project bulk moduli (matbench_log_kvrh), one row per "
                   "structure: polymorphs share a formula"),
    "mp_e_hull": ("e_above_hull", "eV/atom", "DFT energy above the convex hull", "mp_bench",
                  "Materials Project energies above the hull, one row per formula"),
    "mp_bulk_modulus": ("bulk_modulus", "GPa", "Voigt-Reuss-Hill bulk modulus (DFT elastic tensor)",
                        "mp_elastic_bench", "Materials Project bulk moduli, one row per formula"),
    "mp_shear_modulus": ("shear_modulus", "GPa", "Voigt-Reuss-Hill shear modulus (DFT elastic tensor)",
                         "mp_elastic_bench", "Materials Project shear moduli, one row per formula"),
    "aflow_egap": ("band_gap", "eV", "DFT (PBE) band gap (AFLOW Egap)", "aflow",
                   "AFLOW band gaps, one row per formula"),
    "aflow_energy_atom": ("energy_per_atom", "eV/atom", "DFT (PBE) total energy per atom (AFLOW energy_atom)",
                          "aflow", "AFLOW total energies per atom, one row per formula"),
    "oqmd_bandgap": ("band_gap", "eV", "DFT band gap", "oqmd", "OQMD band gaps, one row per formula"),
    "oqmd_formation_enthalpy": ("formation_enthalpy", "eV/atom", "DFT formation enthalpy per atom",
                                "oqmd", "OQMD formation enthalpies, one row per formula (the train "
                                "split is not mirrored)"),
    "oqmd_volume_per_atom": ("volume_per_atom", "A^3/atom", "DFT (relaxed) volume per atom", "oqmd",
                             "OQMD volumes per atom, one row per formula (the train split is not "
                             "mirrored)"),
}


def _crabnet_spec(key: str) -> dict[str, Any]:
    upstream, mirror, hashes = _CRABNET_FILES[key]
    target, unit, meaning, origin, what = _CRABNET_TARGETS[key]
    if isinstance(hashes, str):  # one file, no upstream split
        files = [_file("train", f"crabnet/{mirror}", _CRABNET, f"data/{upstream}", hashes)]
        what += "; the whole set is the one split 'train'"
    else:
        files = [
            _file(split, f"crabnet/{mirror}/{split}.csv", _CRABNET, f"data/{upstream}/{split}.csv", sha)
            for split, sha in hashes.items()
        ]
    data_licence, source_citation = _ORIGINS[origin]
    return {
        "name": f"crabnet_{key}",
        "description": f"{what}; chemical formula + target only, no structures (CrabNet data)",
        "kind": "formula",
        "files": files,
        "id_column": None,
        "structure_column": None,
        "formula_column": "formula",
        "targets": {target: _target("target", unit, meaning)},
        "extra_columns": (),
        "licence": f"{_LIC_CRABNET}; {data_licence}",
        "citation": f"{_CITE_CRABNET} {source_citation}",
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
    *(_crabnet_spec(key) for key in _CRABNET_FILES),
    {
        "name": "crabnet_licence",
        "description": "the MIT licence of the CrabNet repository, which covers every crabnet_* file",
        "kind": "resource",
        "files": [
            _file("file", "crabnet/LICENSE.md", _CRABNET, "LICENSE.md",
                  "fa5ec26308b1458d0480f897d9fa8be3afe8e436b81aa5e1d94f890864e0169b"),
        ],
        "id_column": None,
        "structure_column": None,
        "targets": {},
        "extra_columns": (),
        "licence": "MIT",
        "citation": _CITE_CRABNET,
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
        f"unknown dataset {name!r}. {hint}(`cloudlab data list` shows all {len(REGISTRY)})"
    )
