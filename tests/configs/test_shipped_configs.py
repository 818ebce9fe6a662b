"""Every settings file shipped in configs/ loads, validates, and (with DP) keeps what its comments claim."""

from pathlib import Path

import pytest

from fedpersona.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_configs_exist():
    assert CONFIGS, "configs/*.toml not found"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates_with_dp(path):
    config = RunConfig.from_toml(path)
    config.replace(dp_epsilon=8.0, dp_delta=1e-5)  # the command line's --dp --target-epsilon 8 --delta 1e-5


def test_dp_pal_recipe():
    config = RunConfig.from_toml(Path(CONFIGS[0]).parent / "dp-pal.toml")
    assert config.scheme == "pal" and 0 < config.dp_private_clip_share < 0.5
    assert config.pal_init_std < RunConfig().pal_init_std
    assert config.dp_settings.private_clip_share == config.dp_private_clip_share
