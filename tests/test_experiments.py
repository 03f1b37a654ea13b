"""Grid summaries, presets and the paper's reference tables."""
import json

import pandas as pd
import pytest
import torch

from trm_utils import experiments as E
from trm_utils import budget as B
from trm_utils import tables as TB
from trm_utils import presets as P


def test_paper_tables_reproduce_the_headline_gains():
    assert TB.paper_gains("iseg2019").loc["ours", "gain_pct"] == pytest.approx(1.81, abs=0.02)
    assert TB.paper_gains("fets2021").loc["ours", "gain_pct"] == pytest.approx(4.37, abs=0.02)
    few = TB.paper_table("fewshot")
    avg = few[(few.target == "average") & (few.n_slices == 50)].set_index("method").dice
    assert 100 * (avg["ours"] - avg["vanilla"]) / avg["vanilla"] == pytest.approx(2.85, abs=0.1)


def test_summarize_by_hand():
    rows = []
    for seed, (v1, v2, t1, t2) in enumerate([(0.8, 0.6, 0.9, 0.5), (0.6, 0.6, 0.7, 0.7)]):
        rows += [{"source": "A", "target": "X", "method": "vanilla", "seed": seed, "dice": v1},
                 {"source": "B", "target": "X", "method": "vanilla", "seed": seed, "dice": v2},
                 {"source": "A", "target": "X", "method": "trm", "seed": seed, "dice": t1},
                 {"source": "B", "target": "X", "method": "trm", "seed": seed, "dice": t2}]
    s = TB.summarize(pd.DataFrame(rows))
    assert list(s.index) == ["vanilla", "trm"]
    assert s.loc["vanilla", "dice_mean"] == pytest.approx(0.65)  # seed means 0.7 and 0.6
    assert s.loc["trm", "dice_mean"] == pytest.approx(0.7)
    assert s.loc["vanilla", "dice_std"] == pytest.approx(pd.Series([0.7, 0.6]).std())
    assert s.loc["trm", "gain_pct"] == pytest.approx(100 * 0.05 / 0.65)
    assert s.loc["trm", "cells_won"] == 1  # A: 0.8 vs 0.7 won; B: 0.6 vs 0.6 not won
    assert s.loc["trm", "n_cells"] == 2 and s.loc["trm", "n_seeds"] == 2


def test_presets_and_tasks():
    with pytest.raises(ValueError, match="unknown preset"):
        P.get_preset("huge")
    assert P.get_preset("tutorial", iterations=7)["iterations"] == 7
    p = P.get_preset("paper")
    assert (p["base_channels"], p["depth"], p["lr"], p["iterations"]) == (64, 4, 1e-4, 5000)
    s, t = P.grid_tasks("iseg2019", "paper")
    assert len(s) == len(t) == 6
    with pytest.raises(ValueError, match="unknown dataset"):
        E.resolve_datasets("mnist", "data")


def test_per_dataset_budget(phantom_root, tmp_path):
    cfg = {"iterations": {"iseg2019": 4, "fets2021": 9}, "lr": 1e-3, "eval_every": {"iseg2019": 2}}
    assert P.for_dataset({**cfg, "eval_every": 3}, "fets2021")["iterations"] == 9
    assert P.for_dataset(cfg, "iseg2019")["eval_every"] == 2
    assert P.for_dataset(cfg, "iseg2019")["lr"] == 1e-3 and cfg["iterations"] == {"iseg2019": 4, "fets2021": 9}
    with pytest.raises(ValueError, match="'eval_every' has no value for dataset 'fets2021'"):
        P.for_dataset(cfg, "fets2021")
    # run_grid trains for the dataset's own number of iterations and records it
    grid = P.get_preset("smoke", source_iterations=3, iterations={"iseg2019": 4, "fets2021": 2}, eval_every=2)
    df = E.run_grid("iseg2019", phantom_root, ["WM-T1"], ["GM-T1"], ["vanilla"], [0], grid, cache_dir=tmp_path, log=None)
    assert df.iterations.tolist() == [4] and [i for i, _ in json.loads(df.curve[0])] == [2, 4]
    # the few-shot study runs on its own budget; an explicit iterations replaces it
    few = E.run_grid("iseg2019", phantom_root, ["WM-T1"], ["GM-T1"], ["vanilla"], [0], {**grid, "fewshot": {"iterations": 2}},
                     max_slices=4, cache_dir=tmp_path, log=None)
    assert few.iterations.tolist() == [2]
    assert P.get_preset("tutorial")["fewshot"]["iterations"] == 400
    assert "iterations" not in P.get_preset("tutorial", iterations=7)["fewshot"]


def test_source_model_cache(phantom_root, tmp_path):
    cfg = P.get_preset("smoke", source_iterations=3)
    m1, info1 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path)
    m2, info2 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path)
    assert (info1["status"], info2["status"]) == ("trained", "loaded")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert (a == b).all()
    _, info3 = E.source_model("iseg2019", phantom_root, "GM-T1", P.get_preset("smoke", source_iterations=4), cache_dir=tmp_path)
    assert info3["status"] == "trained"  # a changed setting is a new model
    aug = P.get_preset("smoke", source_iterations=3, source_augment={"iseg2019": True, "fets2021": False, "msd": False})
    assert E.source_model_path("iseg2019", phantom_root, "GM-T1", aug, cache_dir=tmp_path) != \
        E.source_model_path("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path)  # augmenting is a new model


def test_run_grid_batched_equals_per_run(phantom_root, tmp_path):
    cfg = P.get_preset("smoke", source_iterations=3, iterations=6, eval_every=3)
    kw = dict(cfg=cfg, cache_dir=tmp_path, log=None)
    methods = ["vanilla", "trm", "trm@map=image", "trs_map"]
    ka, kb = ({("WM-T1", "GM-T1", "trm", 1): None} for _ in range(2))
    a = E.run_grid("iseg2019", phantom_root, ["WM-T1"], ["GM-T1"], methods, [0, 1], engine="batched", keep_models=ka, **kw)
    b = E.run_grid("iseg2019", phantom_root, ["WM-T1"], ["GM-T1"], methods, [0, 1], engine="per_run", keep_models=kb, **kw)
    assert len(a) == len(b) == 8 and a.map_leep.notna().all()
    # the kept run's model is the one the grid trained: the same weights from both engines
    ma, mb = ka[("WM-T1", "GM-T1", "trm", 1)], kb[("WM-T1", "GM-T1", "trm", 1)]
    assert len(ka) == 1 and not ma.training
    for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5, msg=n)
    key = ["source", "target", "method", "seed"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert (a[key] == b[key]).all().all()
    assert a.dice.tolist() == pytest.approx(b.dice.tolist(), abs=1e-6)
    assert a.final_loss.tolist() == pytest.approx(b.final_loss.tolist(), rel=1e-4)
    with pytest.raises(ValueError, match="engine must be"):
        E.run_grid("iseg2019", phantom_root, ["WM-T1"], ["GM-T1"], ["trm"], [0], engine="vmap", **kw)


def test_few_shot_subset_differs_per_seed(phantom_root, tmp_path):
    cfg = P.get_preset("smoke", source_iterations=3, iterations=2, eval_every=2)
    df = E.run_grid("iseg2019", phantom_root, ["WM-T1"], ["GM-T1"], ["vanilla"], [0, 1], cfg=cfg, cache_dir=tmp_path,
                    log=None, max_slices=5)
    assert df.subset_seed.tolist() == [0, 1] and (df.n_train_slices == 5).all()
    s0 = E.load_task("iseg2019", phantom_root, "GM-T1", "train", cfg, max_slices=5, seed=0)
    s1 = E.load_task("iseg2019", phantom_root, "GM-T1", "train", cfg, max_slices=5, seed=1)
    assert list(zip(s0.subject_ids, s0.slice_index)) != list(zip(s1.subject_ids, s1.slice_index))


def test_run_status_rule():
    its = [100 * k for k in range(1, 13)]
    flat = list(zip(its, [0.5, 0.7, 0.8, 0.85, 0.87, 0.88, 0.88, 0.885, 0.882, 0.884, 0.881, 0.883]))
    assert B.run_status(flat)["status"] == "flat"
    # noisy but flat: raw swings of 0.03 between evaluations smooth away
    noisy = list(zip(its, [0.5, 0.6, 0.62, 0.64, 0.61, 0.64, 0.61, 0.64, 0.61, 0.64, 0.61, 0.64]))
    assert B.run_status(noisy)["status"] == "flat"
    rising = list(zip(its, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.78, 0.80, 0.82, 0.84, 0.86]))
    st = B.run_status(rising)
    # smoothed end (0.84) - smoothed value at iteration 800 (0.7767) > 0.01
    assert st["status"] == "rising" and st["rise"] == pytest.approx(0.84 - (0.70 + 0.75 + 0.78) / 3)
    peak = list(zip(its, [0.5, 0.7, 0.8, 0.82, 0.83, 0.82, 0.80, 0.79, 0.78, 0.78, 0.77, 0.77]))
    st = B.run_status(peak)  # peaked and fell: finished learning, with its size
    assert st["status"] == "overfit" and st["drop"] == pytest.approx((0.82 + 0.83 + 0.82) / 3 - (0.78 + 0.77 + 0.77) / 3)
    # a smaller fall is flat; a rise in the last third wins over an earlier fall
    assert B.run_status(list(zip(its, [0.5, 0.7, 0.8, 0.82, 0.83, 0.82, 0.82, 0.82, 0.82, 0.82, 0.81, 0.81])))["status"] == "flat"
    assert B.run_status([])["status"] == "empty"
    assert B.smooth_curve([0.0, 3.0, 6.0, 9.0]) == [0.0, 1.5, 3.0, 6.0]
    df = pd.DataFrame([{"source": "A", "target": "B", "method": m, "seed": s, "dice": c[-1][1], "curve": json.dumps(c)}
                       for m, cs in (("trm", [rising, peak]), ("vanilla", [flat, [(10, 0.01), (20, 0.02)]]))
                       for s, c in enumerate(cs)])
    counts = B.status_counts(df).set_index("method")
    assert counts.loc["trm", ["runs", "flat", "overfit", "rising", "below_0.05"]].tolist() == [2, 0, 1, 1, 0]
    assert counts.loc["vanilla", ["runs", "flat", "overfit", "rising", "below_0.05"]].tolist() == [2, 2, 0, 0, 1]
    assert counts.loc["trm", "max_drop"] == pytest.approx(B.run_status(peak)["drop"])
    line = B.status_line(counts.reset_index())
    assert "trm: 0 flat, 1 overfit, 1 rising of 2 (largest drop 0.050)" in line and "1 below 0.05" in line


def test_dice_at_and_early_vs_final():
    rows = []
    for seed in (0, 1):
        rows += [{"source": "A", "target": "X", "method": "vanilla", "seed": seed, "iterations": 30, "dice": 0.8,
                  "curve": "[[10, 0.0], [20, 0.5], [30, 0.8]]"},
                 {"source": "A", "target": "X", "method": "trm", "seed": seed, "iterations": 30, "dice": 0.8,
                  "curve": "[[10, 0.4], [20, 0.7], [30, 0.8]]"}]
    df = pd.DataFrame(rows)
    assert TB.dice_at(df, 15).dice.tolist() == [0.0, 0.4, 0.0, 0.4]
    t = TB.early_vs_final(df, 20)
    assert t.loc["trm", ("at 20", "gain_pct")] == pytest.approx(40.0)
    assert t.loc["trm", ("at 30 (end)", "gain_pct")] == pytest.approx(0.0)
    assert len(B.stuck_runs(TB.dice_at(df, 10))) == 2


def test_notebook_header_prints_the_per_dataset_budget(capsys, tmp_path):
    from trm_utils.notebook import setup
    setup(output_dir=tmp_path / "out", preset="tutorial", need_data=False, iterations={"iseg2019": 11, "fets2021": 7})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("device:"))
    assert "fine-tuning iterations: iseg2019 11, fets2021 7 |" in line
    setup(output_dir=tmp_path / "out", preset="smoke", need_data=False, iterations=5)
    assert "fine-tuning iterations: 5 |" in capsys.readouterr().out


def test_parse_method_variants():
    assert P.parse_method("trm") == ("trm", {})
    assert P.parse_method("trm@map=image") == ("trm", {"reading": "image"})
    assert P.parse_method("exp_only@map=dataset,base=2") == ("exp_only", {"reading": "dataset", "base": 2.0})
    assert P.parse_method("trm@refresh=50") == ("trm", {"refresh_every": 50})
    for label, match in [("trm@map=slice", "map must be one of"), ("trm@patch=2", "options are map="),
                         ("vanilla@map=image", "uses no transferability map"), ("trs_map@map=image", "exp\\(-T\\)"),
                         ("trm@base=ten", "base must be a number"), ("nope", "unknown method")]:
        with pytest.raises(ValueError, match=match):
            P.parse_method(label)


def test_prepare_sources_trains_the_missing_ones_in_workers(phantom_root, tmp_path):
    """Sources trained side by side in worker processes (1 thread each) are cached and equal to the
    same source trained in this process with 1 thread; cached ones are only loaded."""
    cfg = P.get_preset("smoke", source_iterations=4)
    jobs = [("iseg2019", phantom_root, "WM-T1"), ("iseg2019", phantom_root, "GM-T2")]
    out = E.prepare_sources(jobs, cfg, device="cpu", cache_dir=tmp_path / "w", workers=2, log=None)
    assert set(out) == {("iseg2019", "WM-T1"), ("iseg2019", "GM-T2")}
    threads = max(1, (__import__("os").cpu_count() or 1) // 2)
    assert all(info["status"].startswith("trained in a worker") for _, info in out.values())
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        here, info = E.source_model("iseg2019", phantom_root, "WM-T1", cfg, device="cpu", cache_dir=tmp_path / "here")
    finally:
        torch.set_num_threads(n)
    assert info["status"] == "trained"
    a, b = out[("iseg2019", "WM-T1")][0].state_dict(), here.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = E.prepare_sources(jobs, cfg, device="cpu", cache_dir=tmp_path / "w", workers=2, log=None)
    assert all(info["status"] == "loaded" for _, info in again.values())
