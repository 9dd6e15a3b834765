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


def test_unset_stats_batches_gives_each_criterion_its_stable_decision_size():
    """prune.stats_batches unset: 512 samples for the taylor family, 2,048 for cosprune (criteria benchmark)."""
    from mtprune.config import PruneSection
    from mtprune.pipeline import decision_batches
    from mtprune.pruning.criteria import get_criterion

    unset = PruneSection(target_macs=0.5)
    assert unset.stats_batches is None and unset.stats_batch_size == 8
    assert decision_batches(unset, get_criterion("task_taylor")) == 64
    assert decision_batches(unset, get_criterion("cosprune")) == 256
    assert decision_batches(PruneSection(target_macs=0.5, stats_batch_size=16), get_criterion("taylor")) == 32
    assert decision_batches(PruneSection(target_macs=0.5, stats_batches=8), get_criterion("cosprune")) == 8
