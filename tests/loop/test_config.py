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
