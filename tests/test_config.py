"""Config validation: errors name the file, the key and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.core.config import RunConfig, ServerConfig, SiteConfig, load_toml, validate
from medfed.core.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_is_named_with_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "site.toml", '[site]\nname = "a"\nservr = "x:1"\n')
    with pytest.raises(ConfigError) as err:
        load_toml(cfg, SiteConfig)
    assert "site.servr" in str(err.value)
    assert str(cfg) in err.value.where
    assert "no such key" in err.value.expected


def test_missing_required_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "site.toml", "[site]\n")
    with pytest.raises(ConfigError) as err:
        load_toml(cfg, SiteConfig)
    assert "site.name" in str(err.value)
    assert "required" in err.value.expected


def test_bad_address_says_expected_form(tmp_path: Path) -> None:
    cfg = write(tmp_path / "site.toml", '[site]\nname = "a"\nserver = "nohost"\n')
    with pytest.raises(ConfigError) as err:
        load_toml(cfg, SiteConfig)
    assert "HOST:PORT" in err.value.expected


def test_out_of_range_port(tmp_path: Path) -> None:
    cfg = write(tmp_path / "server.toml", 'federation = "f"\n[superlink]\nport = 70000\n')
    with pytest.raises(ConfigError) as err:
        load_toml(cfg, ServerConfig)
    assert "superlink.port" in str(err.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "nope.toml", SiteConfig)
    with pytest.raises(ConfigError, match="Not valid TOML"):
        load_toml(write(tmp_path / "bad.toml", "[site\n"), SiteConfig)


def test_run_config_round_trip_and_rejects_garbage() -> None:
    run = RunConfig(
        task="tiny-seg", strategy="fedprox", strategy_options={"proximal_mu": 0.1}, rounds=4
    )
    assert RunConfig.from_json(run.to_json()) == run
    with pytest.raises(ConfigError):
        RunConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="rounds"):
        validate(RunConfig, {"task": "t", "rounds": 0}, where="medfed run options")


def test_a_heartbeat_flower_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    from medfed.client.site import SITE_TOML

    cfg = tmp_path / "site.toml"
    text = SITE_TOML.format(name="s", server="127.0.0.1:9200", runtime_port=9300, seed=0, profile=0)
    cfg.write_text(text)
    assert load_toml(cfg, SiteConfig).site.heartbeat_interval_s == 30.0  # Flower's default
    cfg.write_text(text.replace("heartbeat_interval_s = 30", "heartbeat_interval_s = 5"))
    with pytest.raises(ConfigError) as err:
        load_toml(cfg, SiteConfig)
    assert "heartbeat_interval_s" in str(err.value) and "10" in str(err.value)
