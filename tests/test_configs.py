"""Every shipped config validates against its schema."""

from pathlib import Path

import pytest

from mtprune.config import load_config
from mtprune.merging.experiment import load_merge_config
from mtprune.merging.mfis.run import load_mfis_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    loaders = {"merge_pam": load_merge_config, "merge_mfis": load_mfis_config}
    loader = loaders.get("_".join(path.stem.split("_")[:2]), load_config)
    cfg = loader(path)
    assert cfg.name == path.stem


def test_configs_exist():
    assert len(CONFIGS) >= 8
