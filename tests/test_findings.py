"""The budget ladder and "where does TRM help" (``findings.py``) on runs whose answers are known."""
import json

import numpy as np
import pandas as pd
import pytest

from trm_utils import findings as F


def _runs(cells, dice, factor=1, iterations=100, methods=("vanilla", "trm"), seeds=(0, 1, 2), extra=None):
    rows = []
    for i, (src, tgt) in enumerate(cells):
        for m in methods:
            for sd in seeds:
                d = dice(i, m, sd)
                rows.append({"dataset": "iseg2019", "source": src, "target": tgt, "n_slices": np.nan, "method": m,
                             "seed": sd, "dice": d, "iterations": iterations * factor, "factor": factor,
                             "curve": json.dumps([[iterations * factor, d]]), **(extra(i) if extra else {})})
    return pd.DataFrame(rows)


def test_spearman_ci_finds_a_monotone_relation_and_not_noise():
    x = np.arange(12, dtype=float)
    up = F.spearman_ci(x, x ** 2, n_boot=300)
    assert up["rho"] == pytest.approx(1.0) and up["ci_low"] > 0.9 and up["n_cells"] == 12
    down = F.spearman_ci(x, -x, n_boot=300)
    assert down["rho"] == pytest.approx(-1.0) and down["ci_high"] < -0.9
    noise = F.spearman_ci(x, np.random.default_rng(3).permutation(12).astype(float), n_boot=500)
    assert noise["ci_low"] < 0 < noise["ci_high"]
    few = F.spearman_ci([1, 2], [2, 1])  # no statistic over fewer than 3 points
    assert few["n_cells"] == 2 and np.isnan(few["rho"]) and np.isnan(few["ci_low"])
    assert np.isnan(F.spearman_ci([1, 1, 1, 1], [1, 2, 3, 4])["rho"])  # a constant side: no rank order


def test_where_trm_helps_per_table_and_over_all_cells():
    cells = [(f"S{i}", "T") for i in range(8)]
    # TRM's gain grows with pixel-LEEP; risk_share_5 is unrelated (alternating)
    dice = lambda i, m, sd: 0.5 * (1 + 0.01 * i) if m == "trm" else 0.5  # noqa: E731
    extra = lambda i: {"pixel_leep": -2.0 + 0.1 * i, "map_leep": -1.0, "risk_share_5": [0.1, 0.9][i % 2]}  # noqa: E731
    runs = _runs(cells, dice, extra=extra)
    cell_rows, stats = F.where_trm_helps({"t1": runs, "t2": runs.assign(target="U")}, n_boot=300)
    assert len(cell_rows) == 16 and cell_rows.gain_pct.max() == pytest.approx(7.0)
    s = stats.set_index(["table", "predictor"])
    assert s.loc[("t1", "pixel_leep"), "rho"] == pytest.approx(1.0) and s.loc[("t1", "pixel_leep"), "predicts"]
    assert not s.loc[("t1", "risk_share_5"), "predicts"]
    assert np.isnan(s.loc[("t1", "map_leep"), "rho"]) and not s.loc[("t1", "map_leep"), "predicts"]  # constant
    assert s.loc[("all", "pixel_leep"), "n_cells"] == 16
    line = F.helps_line(stats, "t1")
    assert "predicts the gain: pixel_leep" in line and "risk_share_5 rho" in line and "map_leep: no statistic" in line
    fig = F.helps_figure(cell_rows)
    assert len(fig.axes) == 6  # one row per table, one panel per predictor
    # a sweep from before risk_share_5 existed: that predictor is left out, the rest answered
    _, old = F.where_trm_helps({"t1": runs.drop(columns="risk_share_5")}, n_boot=100)
    assert set(old.predictor) == {"pixel_leep", "map_leep"}


def test_budget_ladder_reads_the_sample_at_every_budget():
    sample = [("A", "T"), ("B", "T")]
    rest = [("C", "T")]
    runs = []
    for k in (1, 2, 4):  # TRM's gain shrinks as the budget grows: 10 %, 5 %, 2.5 %
        runs.append(_runs(sample, lambda i, m, sd, k=k: 0.5 * (1 + 0.1 / k) if m == "trm" else 0.5, factor=k))
    runs.append(_runs(rest, lambda i, m, sd: 0.6, factor=2))  # a table cell at one budget only: not the sample
    lad = F.budget_ladder(pd.concat(runs, ignore_index=True))
    trm = lad[lad.method == "trm"].set_index("factor")
    assert list(trm.index) == [1, 2, 4] and list(trm.iterations) == [100, 200, 400] and set(trm.cells) == {2}
    assert trm.gain_pct.tolist() == pytest.approx([10.0, 5.0, 2.5])
    fig = F.ladder_figure({"table1_iseg2019": lad}, {"table1_iseg2019": 1.8})
    assert [ln.get_label() for ln in fig.axes[0].get_lines()][0] == "trm"
    assert F.budget_ladder(_runs(rest, lambda i, m, sd: 0.6)).empty  # one budget: no ladder
    # a step still running (one of the sample's two cells in at 8x): its point is marked as partial
    part = pd.concat(runs + [_runs(sample[:1], lambda i, m, sd: 0.5, factor=8)], ignore_index=True)
    lad8 = F.budget_ladder(part)
    assert lad8.set_index(["factor", "method"]).loc[(8, "trm"), "cells"] == 1
    ax = F.ladder_figure({"table1_iseg2019": lad8}).axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["100", "200", "400", "800\n(1 of 2 cells)"]
    hollow = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [800]
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_markerfacecolor() == "white"]  # every step whole
    view = F.ladder_view(lad8).set_index("iterations")  # the report's table says so too
    assert view.cells.tolist() == ["2", "2", "2", "1 of 2, step running"] and list(view.columns) == ["cells", "vanilla", "trm"]
    assert view.loc[400, "trm"] == pytest.approx(2.5) and view.loc[800, "trm"] == pytest.approx(0.0)
    assert F.ladder_view(F.budget_ladder(_runs(rest, lambda i, m, sd: 0.6))).empty


def test_spearman_within_tells_an_order_of_sources_from_a_difference_between_targets():
    rng = np.random.default_rng(0)
    groups = np.repeat(["A", "B", "C", "D"], 5)
    level = np.repeat([0.0, 1.0, 2.0, 3.0], 5)
    noise = np.concatenate([rng.permutation(5) for _ in range(4)]).astype(float)
    # between targets only: predictor and gain both follow the target, within a target unrelated
    x, y = level + 0.01 * np.tile(np.arange(5), 4), level + 0.01 * noise
    assert F.spearman_ci(x, y, n_boot=300)["ci_low"] > 0.5
    w = F.spearman_within(x, y, groups, n_boot=500)
    assert w["n_groups"] == 4 and w["n_cells"] == 20 and w["ci_low"] < w["rho"] < w["ci_high"]
    assert w["ci_low"] < 0 < w["ci_high"] and w["p"] > 0.05
    # a real order within every target, hidden across cells by targets that go the other way
    y2 = -3 * level + 0.1 * np.tile(np.arange(5), 4)
    assert F.spearman_within(x, y2, groups, n_boot=300)["rho"] == pytest.approx(1.0)
    assert F.spearman_within(x, y2, groups, n_boot=300)["p"] < 0.01
    assert F.spearman_ci(x, y2, n_boot=300)["rho"] < 0
    # one group: Spearman's rho itself; equal groups without ties: the mean of the groups' rhos
    from scipy.stats import spearmanr
    a, b = rng.normal(size=7), rng.normal(size=7)
    assert F.spearman_within(a, b, ["A"] * 7, n_boot=50)["rho"] == pytest.approx(spearmanr(a, b)[0])
    per = [spearmanr(x[groups == g], y[groups == g])[0] for g in "ABCD"]
    assert w["rho"] == pytest.approx(np.mean(per))
    # groups with fewer than 3 cells or a constant side are left out; none left: no statistic
    few = F.spearman_within([1, 2, 1, 2], [2, 1, 1, 2], ["A", "A", "B", "B"])
    assert few["n_groups"] == 0 and np.isnan(few["rho"])


def test_where_trm_helps_names_a_between_targets_rho():
    cells = [(f"S{i}", t) for t in ("T", "U", "V") for i in range(4)]
    lvl = {"T": 0, "U": 1, "V": 2}
    order = [2, 0, 3, 1]  # within a target the gain does not follow pixel-LEEP
    dice = lambda i, m, sd: 0.5 * (1 + 0.02 * lvl[cells[i][1]] + 0.001 * order[i % 4]) if m == "trm" else 0.5  # noqa: E731
    extra = lambda i: {"pixel_leep": lvl[cells[i][1]] + 0.01 * (i % 4), "map_leep": -1.0, "risk_share_5": 0.1}  # noqa: E731
    _, stats = F.where_trm_helps({"t1": _runs(cells, dice, extra=extra)}, n_boot=300)
    r = stats.set_index("predictor").loc["pixel_leep"]
    assert r.predicts and not r.predicts_within and r.within_groups == 3
    line = F.helps_line(stats, "t1")
    assert "within 3 targets" in line and "within targets: none" in line and "pixel_leep: a difference between targets" in line


def test_where_trm_helps_keeps_an_early_budget_table_out_of_all():
    cells = [(f"S{i}", "T") for i in range(6)]
    dice = lambda i, m, sd: 0.5 * (1 + 0.01 * i) if m == "trm" else 0.5  # noqa: E731
    extra = lambda i: {"pixel_leep": -2.0 + 0.1 * i, "map_leep": -1.0 + 0.05 * (i % 2), "risk_share_5": 0.1}  # noqa: E731
    runs = _runs(cells, dice, extra=extra)
    tables = {"t1": runs, "t3": runs.assign(target="U"), "t2": runs.assign(target="V")}
    cell_rows, stats = F.where_trm_helps(tables, n_boot=200, early=["t2"])
    s = stats.set_index(["table", "predictor"])
    # all pools the two accepted tables only; the early one is answered alone and flagged
    assert s.loc[("all", "pixel_leep"), "n_cells"] == 12 and not s.loc[("all", "pixel_leep"), "early_budget"]
    assert s.loc[("t2", "pixel_leep"), "early_budget"] and not s.loc[("t1", "pixel_leep"), "early_budget"]
    assert set(cell_rows[cell_rows.early_budget].table) == {"t2"}
    assert "EARLY-BUDGET" in F.helps_line(stats, "t2") and "not pooled in `all`" in F.helps_line(stats, "t2")
    assert "EARLY-BUDGET" not in F.helps_line(stats, "all") and "EARLY-BUDGET" not in F.helps_line(stats, "t1")
    # one accepted table: nothing to pool; none accepted: all pools everything and is itself early
    _, one = F.where_trm_helps({"t1": runs, "t2": runs.assign(target="V")}, n_boot=100, early=["t2"])
    assert "all" not in set(one.table)
    _, none = F.where_trm_helps(tables, n_boot=100, early=list(tables))
    a = none.set_index(["table", "predictor"]).loc[("all", "pixel_leep")]
    assert a.n_cells == 18 and a.early_budget and "not pooled" not in F.helps_line(none, "all")
    fig = F.helps_figure(cell_rows)
    assert [a.get_title() for a in fig.axes[::3]] == ["t1", "t2 (early-budget)", "t3"]


def test_normaliser_spread_reads_eq7s_divisor_batch_by_batch():
    import torch

    y = torch.zeros(4, 8, 8, dtype=torch.long)
    y[0] = 1  # 64 foreground pixels of 64: ratio 1
    y[1, :4, :4] = 2  # 16: ratio 4
    y[2, :2, :2] = 1  # 4: ratio 16
    # slice 3 has none: eq. (7) falls back to the pixel count, ratio 1
    s = F.normaliser_spread(y, batch_size=1, n_batches=4)  # one epoch: every slice once, in any order
    assert s["slices"] == 4 and s["empty_slices"] == pytest.approx(0.25) and s["fg_share"] == pytest.approx((0.25 + 0.0625) / 2)
    assert s["median"] == pytest.approx(2.5) and s["max"] == pytest.approx(16.0) and s["max_over_median"] == pytest.approx(6.4)
    even = torch.zeros(6, 8, 8, dtype=torch.long)
    even[:, :4] = 1  # every slice half foreground: a constant divisor, which Adam ignores
    e = F.normaliser_spread(even, batch_size=2, seed=3, n_batches=50)
    assert e["median"] == pytest.approx(2.0) and e["max_over_median"] == pytest.approx(1.0) and e["p95_over_p5"] == pytest.approx(1.0)
    assert F.normaliser_spread(y, 2, seed=5) == F.normaliser_spread(y, 2, seed=5)  # the same seed, the same batches
    with pytest.raises(ValueError, match="N x H x W"):
        F.normaliser_spread(torch.zeros(8, 8), 2)
    with pytest.raises(ValueError, match="n_batches"):
        F.normaliser_spread(y, 2, n_batches=0)

