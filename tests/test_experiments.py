"""Grid summaries, presets and the paper's reference tables."""
import pandas as pd
import pytest

from trm_utils import experiments as E


def test_paper_tables_reproduce_the_headline_gains():
    assert E.paper_gains("iseg2019").loc["ours", "gain_pct"] == pytest.approx(1.81, abs=0.02)
    assert E.paper_gains("fets2021").loc["ours", "gain_pct"] == pytest.approx(4.37, abs=0.02)
    few = E.paper_table("fewshot")
    avg = few[(few.target == "average") & (few.n_slices == 50)].set_index("method").dice
    assert 100 * (avg["ours"] - avg["vanilla"]) / avg["vanilla"] == pytest.approx(2.85, abs=0.1)


def test_summarize_by_hand():
    rows = []
    for seed, (v1, v2, t1, t2) in enumerate([(0.8, 0.6, 0.9, 0.5), (0.6, 0.6, 0.7, 0.7)]):
        rows += [{"source": "A", "target": "X", "method": "vanilla", "seed": seed, "dice": v1},
                 {"source": "B", "target": "X", "method": "vanilla", "seed": seed, "dice": v2},
                 {"source": "A", "target": "X", "method": "trm", "seed": seed, "dice": t1},
                 {"source": "B", "target": "X", "method": "trm", "seed": seed, "dice": t2}]
    s = E.summarize(pd.DataFrame(rows))
    assert list(s.index) == ["vanilla", "trm"]
    assert s.loc["vanilla", "dice_mean"] == pytest.approx(0.65)  # seed means 0.7 and 0.6
    assert s.loc["trm", "dice_mean"] == pytest.approx(0.7)
    assert s.loc["vanilla", "dice_std"] == pytest.approx(pd.Series([0.7, 0.6]).std())
    assert s.loc["trm", "gain_pct"] == pytest.approx(100 * 0.05 / 0.65)
    assert s.loc["trm", "cells_won"] == 1  # A: 0.8 vs 0.7 won; B: 0.6 vs 0.6 not won
    assert s.loc["trm", "n_cells"] == 2 and s.loc["trm", "n_seeds"] == 2


def test_presets_and_tasks():
    with pytest.raises(ValueError, match="unknown preset"):
        E.get_preset("huge")
    assert E.get_preset("tutorial", iterations=7)["iterations"] == 7
    p = E.get_preset("paper")
    assert (p["base_channels"], p["depth"], p["lr"], p["iterations"]) == (64, 4, 1e-4, 5000)
    s, t = E.grid_tasks("iseg2019", "paper")
    assert len(s) == len(t) == 6
    with pytest.raises(ValueError, match="unknown dataset"):
        E.resolve_datasets("mnist", "data")


def test_source_model_cache(phantom_root, tmp_path):
    cfg = E.get_preset("smoke", source_iterations=3)
    m1, info1 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path)
    m2, info2 = E.source_model("iseg2019", phantom_root, "GM-T1", cfg, cache_dir=tmp_path)
    assert (info1["status"], info2["status"]) == ("trained", "loaded")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert (a == b).all()
    _, info3 = E.source_model("iseg2019", phantom_root, "GM-T1", E.get_preset("smoke", source_iterations=4), cache_dir=tmp_path)
    assert info3["status"] == "trained"  # a changed setting is a new model
