from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cloud_model.errors import ConfigError
from loop.config import CampaignConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
CAMPAIGNS = [p for p in CONFIGS if not p.name.startswith(("pretrain", "finetune", "bench"))]


def test_there_are_example_campaigns() -> None:
    names = {p.name for p in CAMPAIGNS}
    assert {
        "perovskite_water_splitting.yaml",
        "http_lab.yaml",
        "low_debye_temperature.yaml",
    } <= names


@pytest.mark.parametrize("path", CAMPAIGNS, ids=lambda p: p.name)
def test_every_example_campaign_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, CampaignConfig)
    spec = config.objective_spec()
    assert spec.targets[0] == config.objective.target
    # round trip through JSON (the store keeps the config as JSON)
    assert CampaignConfig.model_validate_json(config.model_dump_json()) == config


def _base() -> dict:
    # the main job's config: it has every section the mutations below touch
    main = next(p for p in CAMPAIGNS if p.name == "perovskite_water_splitting.yaml")
    return yaml.safe_load(main.read_text())


def test_errors_name_the_field_path(tmp_path: Path) -> None:
    data = _base()
    data["acquisition"]["bach_size"] = 4
    data["budget"]["experiments"] = 0
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="my.yaml")
    text = str(err.value)
    assert "my.yaml: acquisition.bach_size: Extra inputs are not permitted" in text
    assert "budget.experiments" in text


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["adapter"].update(kind="teleporter"), "adapter"),
        (lambda d: d["objective"].update(sense="window"), "window is required"),
        (lambda d: d["constraints"].append({"target": "x"}), "needs a lower or an upper bound"),
        (lambda d: d["pool"].update(file="x.csv"), "exactly one of pool.dataset or pool.file"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["acquisition"].update(kind="magic"), "acquisition.kind"),
    ],
)
def test_bad_configs_fail_clearly(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_shortlist_defaults_per_surrogate() -> None:
    from loop.config import AcquisitionConfig

    # exact GP joint posteriors are costly per candidate; cached ensemble predictions are not
    assert AcquisitionConfig().shortlist_for("gp") == 256
    assert AcquisitionConfig().shortlist_for("cloud_ensemble") == 2048
    assert AcquisitionConfig(shortlist=64).shortlist_for("gp") == 64
    with pytest.raises(ValueError, match="shortlist"):
        AcquisitionConfig(shortlist=3)


def test_validating_a_config_imports_no_torch_ray_or_botorch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from loop.config import load_config\n"
        "load_config('configs/perovskite_water_splitting.yaml')\n"
        "print(sorted(m for m in ('torch', 'ray', 'botorch', 'gpytorch') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_batch_larger_than_the_concurrency_is_a_config_error() -> None:
    data = yaml.safe_load((REPO / "configs" / "perovskite_water_splitting.yaml").read_text())
    data["acquisition"]["batch_size"] = 12
    data["dispatch"]["concurrency"] = 8
    with pytest.raises(ConfigError, match="batch_size 12 exceeds dispatch.concurrency 8"):
        parse_config(data)


def test_a_typo_in_gpaw_settings_is_a_config_error_naming_the_field() -> None:
    data = yaml.safe_load((REPO / "configs" / "gpaw_small.yaml").read_text())
    data["adapter"]["settings"] = {**data["adapter"].get("settings", {}), "cutof_ev": 300}
    with pytest.raises(ConfigError, match=r"adapter\.gpaw\.settings.*settings\.cutof_ev"):
        parse_config(data)
    data["adapter"]["settings"] = {"cutoff_ev": -1}
    with pytest.raises(ConfigError, match="settings.cutoff_ev"):
        parse_config(data)


# --- strict YAML reading (cloud_model.yaml_file) and size bounds ---------------------------------


def _main_text() -> str:
    return (REPO / "configs" / "perovskite_water_splitting.yaml").read_text()


def test_a_repeated_key_is_an_error_naming_it_and_both_lines(tmp_path: Path) -> None:
    text = _main_text()
    first = text.splitlines().index("budget:") + 1
    path = tmp_path / "dup.yaml"
    path.write_text(text + "budget:\n  experiments: 5\n")
    n_lines = len(path.read_text().splitlines())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message == (
        f"campaign config {path}: duplicate key 'budget' at line {n_lines - 1} "
        f"(first at line {first}); keep one of them"
    )
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("  n_members: 5\n", "  n_members: 5\n  n_members: 7\n"))
    with pytest.raises(ConfigError, match="duplicate key 'n_members' at line"):
        load_config(nested)
    flow = tmp_path / "flow.yaml"
    flow.write_text(text.replace("noise: {sigma: 0.03}", "noise: {sigma: 0.03, sigma: 0.5}"))
    with pytest.raises(ConfigError, match=r"duplicate key 'sigma' at line \d+, column \d+"):
        load_config(flow)


def test_merge_keys_may_be_overridden_and_aliases_are_bounded(tmp_path: Path) -> None:
    from cloud_model.yaml_file import MAX_EXPANDED_NODES, read_yaml

    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_yaml(merged, what="test file") == {
        "base": {"x": 1, "y": 2},
        "other": {"x": 3, "y": 2},
    }
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ConfigError, match=f"once its aliases are expanded, more than {MAX_EXPANDED_NODES:,}"
    ):
        read_yaml(bomb, what="test file")
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="anchor at line 1 is used inside itself"):
        read_yaml(recursive, what="test file")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_yaml(deep, what="test file")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("a: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        read_yaml(tagged, what="test file")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty, what="test file") is None


def test_a_binary_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: x\n\xff\xfe\x00\x01 junk")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"campaign config {path}: not a UTF-8 text file (byte 0xff at offset 8); give a YAML "
        "text file"
    )
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\n\x00\n")
    with pytest.raises(ConfigError, match="not valid YAML: unacceptable character #x0000"):
        load_config(nul)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("section", "field", "value", "limit"),
    [
        ("surrogate", "n_members", 1e9, 64),
        ("surrogate", "gp_max_train", 10**7, 20_000),
        ("acquisition", "batch_size", 100_000, 4096),
        ("acquisition", "shortlist", 10**9, 100_000),
        ("initial_design", "n_random", 10**9, 1_000_000),
        ("budget", "experiments", 10**12, 1_000_000),
    ],
)
def test_sizes_have_sane_upper_bounds(section: str, field: str, value: float, limit: int) -> None:
    data = _base()
    data[section][field] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: .*less than or equal to {limit}"):
        parse_config(data)
    data[section][field] = limit
    data["dispatch"]["concurrency"] = max(data["dispatch"]["concurrency"], limit)
    parse_config(data)


def test_seed_must_fit_the_random_generators() -> None:
    data = _base()
    for bad in (-1, 2**32):
        data["seed"] = bad
        with pytest.raises(ConfigError, match="seed"):
            parse_config(data)


def test_every_yaml_reader_refuses_repeated_keys_and_binary_files(tmp_path: Path) -> None:
    from cloud_model.finetune_job import FinetuneJob
    from cloud_model.pretrain_config import PretrainConfig
    from loop.bench import load_bench
    from loop.cli.lab import build_config

    dup_bench = tmp_path / "bench.yaml"
    bench_text = (REPO / "configs" / "bench_perov_5.yaml").read_text()
    dup_bench.write_text(bench_text.replace("campaign:", "campaign: x.yaml\ncampaign:", 1))
    readers = [
        (lambda p: load_bench(p), "benchmark config", dup_bench),
        (PretrainConfig.from_yaml, "pretraining config", None),
        (FinetuneJob.from_yaml, "fine-tuning config", None),
        (lambda p: build_config(Path(p), {}), "lab config", None),
    ]
    for read, what, dup in readers:
        if dup is None:
            dup = tmp_path / f"{what.split()[0]}.yaml"
            dup.write_text("seed: 1\nseed: 2\n")
        with pytest.raises(ConfigError, match=f"{what} {dup}: duplicate key"):
            read(dup)
        binary = tmp_path / "binary.yaml"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n")
        with pytest.raises(ConfigError, match=f"{what} {binary}: not a UTF-8 text file"):
            read(binary)
