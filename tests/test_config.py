from dataclasses import dataclass, field
from typing import Literal

import pytest

from spatialcore.config import ConfigError, load_config, param, to_dict
from spatialcore.tiny import TinyConfig


@dataclass
class Inner:
    rate: float = param(0.1, min=0.0, max=1.0)
    names: list[str] = field(default_factory=lambda: ["a"])
    mode: Literal["fast", "slow"] = "fast"


@dataclass
class Outer:
    steps: int = param(10, min=1)
    label: str = "run"
    maybe: int | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def check(self):
        if self.flag and self.steps < 5:
            raise ConfigError("steps", "must be >= 5 when flag is set")


def test_defaults_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ninner:\n  rate: 1\n  names: [x, y]\n")
    cfg = load_config(Outer, path)
    assert cfg.steps == 3 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.names == ["x", "y"] and cfg.label == "run" and cfg.maybe is None


def test_overrides_are_typed_by_field():
    cfg = load_config(Outer, None, ["steps=7", "label=123", "maybe=4", "flag=true", "inner.mode=slow", "inner.rate=1e-3",
                                    "inner.names=[p, q]"])
    assert cfg.steps == 7 and cfg.label == "123" and cfg.maybe == 4 and cfg.flag is True
    assert cfg.inner.mode == "slow" and cfg.inner.names == ["p", "q"] and cfg.inner.rate == 1e-3
    assert load_config(Outer, None, ["maybe=null"]).maybe is None


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["stpes=3"], "stpes", "did you mean 'steps'"),
        (["inner.rat=0.5"], "inner.rat", "unknown key"),
        (["steps=1.5"], "steps", "expected an integer"),
        (["steps=true"], "steps", "expected an integer"),
        (["flag=1"], "flag", "expected true/false"),
        (["inner.rate=abc"], "inner.rate", "expected a number"),
        (["inner.mode=medium"], "inner.mode", "must be one of"),
        (["steps=0"], "steps", "must be >= 1"),
        (["inner.rate=1.5"], "inner.rate", "must be <= 1.0"),
        (["flag=true", "steps=2"], "steps", "when flag is set"),
        (["label.x=1"], "label", "expected a string"),
        (["justakey"], "justakey", "key=value"),
    ],
)
def test_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, overrides)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, top)


def test_extends_lays_a_file_over_another(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\nlabel: base\ninner:\n  rate: 0.5\n  mode: slow\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\nlabel: mid\ninner:\n  names: [x, y]\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "top.yaml").write_text("extends: ../mid.yaml\ninner:\n  rate: 0.25\n")
    cfg = load_config(Outer, sub / "top.yaml", ["steps=9"])
    # each file keeps what the one above it leaves alone, section by section; overrides still win
    assert (cfg.steps, cfg.label) == (9, "mid")
    assert (cfg.inner.rate, cfg.inner.names, cfg.inner.mode) == (0.25, ["x", "y"], "slow")


def test_extends_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Outer, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="file not found: .*nowhere.yaml") as err:
        load_config(Outer, tmp_path / "c.yaml")
    assert err.value.key.endswith("c.yaml: extends")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="expected a file name"):
        load_config(Outer, tmp_path / "d.yaml")


def test_nested_check_gets_prefixed():
    with pytest.raises(ConfigError) as err:
        load_config(TinyConfig, None, ["reward.text_heads=3"])
    assert err.value.key == "reward.text_hidden"


def test_round_trip(tmp_path):
    import yaml

    cfg = load_config(TinyConfig, None, ["flux.vae_channels=[8, 8]", "seed=3"])
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(TinyConfig, path) == cfg


@pytest.mark.parametrize(
    ("override", "key"),
    [("reward.txt_layers=3", "reward.txt_layers"), ("seed=abc", "seed"), ("reward.init_std=-1", "reward.init_std")],
)
def test_cli_config_error_exits_without_traceback(tmp_path, capsys, override, key):
    from spatialcore.cli import main

    assert main(["tiny", "--out", str(tmp_path / "x"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}'" in err[0]
    assert not (tmp_path / "x").exists(), "nothing may be built when the config is invalid"


def test_config_reference_is_current():
    """docs/CONFIG.md is what the code generates (`python -m spatialcore.config_reference > docs/CONFIG.md`)."""
    from pathlib import Path

    from spatialcore.config_reference import render

    committed = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    assert committed == render(), "docs/CONFIG.md is stale: python -m spatialcore.config_reference > docs/CONFIG.md"


def test_every_config_file_is_listed_and_valid():
    """Each file in configs/ is in the reference's table and loads as its kind (the folder names it)."""
    from pathlib import Path

    from spatialcore.config_reference import CONFIG_FILES, config_class

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(CONFIG_FILES)
    for name in files:
        if name.endswith(".yaml"):
            load_config(config_class(name.split("/")[0]), root / name)
