"""Compression stages: configs and parameter counts of each stage, argument checks."""
import pytest

from configs import ringmoe_14b, ringmoe_1b, tiny
from ringmoe.compress import stages


def test_dry_run_of_the_14b_model_matches_the_reference_chain():
    counts = {s["name"]: s["params"] for s in stages.dry_run(ringmoe_14b.get_config(), "optical", 0.25)}
    assert list(counts) == list(stages.STAGES)
    assert counts["full"] == pytest.approx(14.74e9, rel=0.02)
    assert counts["extracted"] == pytest.approx(6.53e9, rel=0.02)
    assert 4.3e9 * 0.98 <= counts["pruned"] <= 4.5e9 * 1.02
    assert counts["dense"] == pytest.approx(1.06e9, rel=0.02)


def test_the_dense_stage_is_configs_ringmoe_1b():
    dense = stages.stage_configs(ringmoe_14b.get_config(), "optical", 0.25)["dense"].model.to_dict()
    target = ringmoe_1b.get_config().model.to_dict()
    dense["moe"].pop("num_collaborative_experts")   # unused once the model is dense
    target["moe"].pop("num_collaborative_experts")
    assert dense == target


def test_kept_experts_and_bad_arguments():
    assert [stages.kept_experts(4, k) for k in (0.25, 0.3, 0.5, 1.0, 0.01)] == [1, 2, 2, 4, 1]
    config = tiny.get_config()
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        stages.stage_configs(config, "lidar", 0.25)
    for keep in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            stages.stage_configs(config, "optical", keep)
    with pytest.raises(ValueError, match="already dense"):
        stages.stage_configs(ringmoe_1b.get_config(), "optical", 0.25)
    sar = stages.stage_configs(config, "sar_l1", 0.5)
    assert list(sar["extracted"].model.modalities) == ["sar_l1"]
    assert sar["pruned"].model.moe.num_collaborative_experts == 1 and not sar["dense"].model.moe.enabled
    assert config.model.moe.enabled and len(config.model.modalities) == 4   # the input is not modified
