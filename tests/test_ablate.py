"""The ablation runner's grid handling and report (training itself: tests/test_train.py)."""
import json
import os

import pytest

from configs.ablations import moe_vs_dense, physics_terms, pretraining_budget, upcycling
from pretrain import ablate
from ringmoe import flops


def test_grids_apply_to_the_tiny_config():
    grid = moe_vs_dense.get_config()
    grid.data_dir = "/data"
    configs = {name: ablate.point_config(grid, dict(o)) for name, o in grid.points}
    assert configs["hierarchical"].data_dir == "/data" and configs["hierarchical"].total_steps == 100
    assert configs["hierarchical"].eval_every == 100   # fixed-batch losses at step 0 and at the end
    dense, moe = configs["dense_equal_flops"].model, configs["hierarchical"].model
    assert not dense.moe.enabled and configs["modal_only"].model.moe.num_collaborative_experts == 0
    # The dense point has the hierarchical model's active FFN FLOPs.
    batch = {m: 1 for m in moe.modalities}
    ffn = lambda c: sum(flops.forward_flops(c, m, 1)["ffn"] for m in batch)  # noqa: E731
    assert ffn(dense) == pytest.approx(ffn(moe), rel=1e-6)

    grid = physics_terms.get_config()
    configs = {name: ablate.point_config(grid, dict(o)) for name, o in grid.points}
    assert len(configs) == 2 + len(physics_terms.TERMS)
    assert configs["no_span"].objectives.span == 0.0 and configs["no_span"].objectives.pauli > 0
    assert all(configs["simmim_only"].objectives[t] == 0.0 for t in physics_terms.TERMS)

    grid = pretraining_budget.get_config()   # the demo's recipe, only its length changes
    configs = {name: ablate.point_config(grid, dict(o)) for name, o in grid.points}
    assert [c.total_steps for c in configs.values()] == [150, 600, 2000]
    demo = ablate.load_config_file("configs/demo.py")
    assert all(c.optimizer == demo.optimizer and c.model == demo.model and c.batch_size == demo.batch_size
               for c in configs.values())


def test_unknown_override_and_missing_data_are_errors():
    grid = moe_vs_dense.get_config()
    with pytest.raises(KeyError, match="model.moe.no_such_key"):
        ablate.point_config(grid, {"model.moe.no_such_key": 1})
    with pytest.raises(ValueError, match="--grid.data_dir"):
        ablate.run(grid, "/tmp/unused")
    grid.data_dir = "/data"
    grid.only = "hierarchical,nope"
    with pytest.raises(ValueError, match="unknown points"):
        ablate.run(grid, "/tmp/unused")
    grid.points = (("a", {}), ("a", {}))
    with pytest.raises(ValueError, match="duplicate point names"):
        ablate.run(grid, "/tmp/unused")


def test_report_table_and_plot_with_seeds(tmp_path):
    results = []
    for i, name in enumerate(("hierarchical", "dense")):
        runs = []
        for s in range(2):
            os.makedirs(tmp_path / name / f"seed-{s}")
            with open(tmp_path / name / f"seed-{s}" / "metrics.jsonl", "w") as f:
                for step in range(1, 6):
                    f.write(json.dumps({"step": step, "loss": (i + 2.0 + s) / step}) + "\n")
            # probe 0.6 + i/10 +- 0.05 over the two seeds: mean 0.6 + i/10, sd (ddof 1) 0.05 * sqrt(2) = 0.0707
            runs.append({"name": name, "total_steps": 5, "probe": "linear", "metric": "top1_accuracy",
                         "active_tflops_per_image": 0.01, "loss": 0.5 + s, "simmim": {"optical": 0.4},
                         "probe_value": {"optical": 0.55 + i / 10 + s / 10},
                         "probe_mean": 0.55 + i / 10 + s / 10})
        results.append(ablate.summarise(name, runs))
    assert results[0]["probe_mean"] == pytest.approx(0.6) and results[0]["probe_mean_sd"] == pytest.approx(0.0707, abs=1e-4)
    assert results[0]["loss"] == pytest.approx(1.0) and results[0]["simmim_sd"]["optical"] == 0.0
    md, png = ablate.write_report(results, str(tmp_path), "moe_vs_dense.py")
    table = open(md).read()
    assert ("| hierarchical | 5 | 10.00 | 1.000 ± 0.707 | 0.400 ± 0.000 | 0.600 ± 0.071 | 0.600 ± 0.071 |"
            in table), table
    assert "| dense |" in table and "over 2 seed(s)" in table
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_point_runs_with_each_seed(tmp_path, monkeypatch):
    seen = []

    def fake_run_point(name, config, workdir, probe, probe_data_dir, source=None):
        seen.append((name, config.seed, os.path.relpath(workdir, tmp_path)))
        return {"name": name, "total_steps": config.total_steps, "probe": probe, "metric": "top1_accuracy",
                "active_tflops_per_image": 0.01, "loss": 1.0, "simmim": {"optical": 0.4},
                "probe_value": {"optical": 0.5 + config.seed / 10}, "probe_mean": 0.5 + config.seed / 10}

    monkeypatch.setattr(ablate, "run_point", fake_run_point)
    grid = moe_vs_dense.get_config()
    assert grid.seeds == 3                                           # the grids' default
    grid.data_dir, grid.only = "/data", "hierarchical"
    [result] = ablate.run(grid, str(tmp_path))
    assert seen == [("hierarchical", s, os.path.join("hierarchical", f"seed-{s}")) for s in range(3)]
    assert result["seeds"] == 3 and result["probe_mean"] == pytest.approx(0.6)
    assert result["probe_mean_sd"] == pytest.approx(0.1)             # sd of 0.5, 0.6, 0.7 (ddof 1)


def test_a_finished_point_is_reused_only_under_its_own_config(tmp_path, monkeypatch):
    import numpy as np

    import pretrain.train
    import ringmoe.eval.features
    import ringmoe.model.checkpoint
    from ringmoe.training.checkpoint import Checkpointer
    trained = []

    def fake_train(config, workdir):  # stands in for training: a checkpoint with the config, one metrics line
        checkpointer = Checkpointer(workdir, keep=1, save_every=1)
        checkpointer.save(config.total_steps, {"x": np.zeros(1)}, {},
                          {"config": json.loads(config.to_json()), "step": config.total_steps}, force=True)
        checkpointer.close()
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": config.total_steps, "loss": 1.0 + len(trained)}) + "\n")
        trained.append(config)

    monkeypatch.setattr(pretrain.train, "train", fake_train)
    monkeypatch.setattr(ringmoe.model.checkpoint, "load_pretrained",
                        lambda workdir: (trained[-1], None, trained[-1].total_steps))
    monkeypatch.setattr(ringmoe.eval.features, "evaluate", lambda *a, **k: {"value": 0.5, "metric": "top1_accuracy"})
    grid = moe_vs_dense.get_config()
    grid.data_dir = "/data"
    name, overrides = grid.points[0]
    workdir = str(tmp_path / name)

    def run(**changes):
        return ablate.run_point(name, ablate.point_config(grid, {**dict(overrides), **changes}), workdir, "knn", "/d")

    assert run()["loss"] == 1.0 and len(trained) == 1
    assert run(log_every=7)["loss"] == 1.0 and len(trained) == 1       # logging only: the same point
    assert run(**{"objectives.simmim": 0.5})["loss"] == 2.0 and len(trained) == 2  # another recipe: trained again
    assert len(trained) == 2 and trained[-1].objectives.simmim == 0.5
    assert any(p.startswith(f"{name}.stale-") for p in os.listdir(tmp_path))  # the old run is kept aside
    assert run(**{"objectives.simmim": 0.5})["loss"] == 2.0 and len(trained) == 2


def test_upcycling_grid_starts_each_second_stage_from_its_first_with_the_same_seed(tmp_path, monkeypatch):
    from pretrain import resume
    seen = {}

    def fake_run_point(name, config, workdir, probe, probe_data_dir, source=None):
        seen[name, config.seed] = (config, source)
        return {"name": name, "total_steps": config.total_steps + (source[2] if source else 0),
                "source": source[0] if source else None, "probe": probe, "metric": "top1_accuracy",
                "active_tflops_per_image": 0.01, "loss": 1.0, "simmim": {"optical": 0.4},
                "probe_value": {"optical": 0.5}, "probe_mean": 0.5}

    monkeypatch.setattr(ablate, "run_point", fake_run_point)
    grid = upcycling.get_config()
    grid.data_dir = "/data"
    results = {r["name"]: r for r in ablate.run(grid, str(tmp_path))}
    # every point trains the same number of steps in all
    assert {r["total_steps"] for r in results.values() if r["name"] != "dense_first_stage"} == {100}
    for seed in range(3):
        first, _ = seen["dense_first_stage", seed]
        for point, init in (("upcycled_random", "random"), ("upcycled_kmeans", "kmeans")):
            config, source = seen[point, seed]
            assert source == ("dense_first_stage", str(tmp_path / "dense_first_stage" / f"seed-{seed}"), 50)
            assert config.model.moe.enabled and not first.model.moe.enabled and config.upcycle.router_init == init
            # the first stage's config is part of the second's key: a changed first stage retrains both
            assert config.upcycle.source_key == resume.config_key(resume.as_json(first))
    assert seen["moe_scratch", 0][1] is None

    grid.only = "upcycled_random"
    with pytest.raises(ValueError, match="must name the first stage of upcycled_random"):
        ablate.run(grid, str(tmp_path))
    grid.only = ""
    grid.points = (("b", {}, "a"), ("a", {}))
    with pytest.raises(ValueError, match="'b' starts from 'a', which is not an earlier point"):
        ablate.run(grid, str(tmp_path))
