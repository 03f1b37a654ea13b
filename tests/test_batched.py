"""The batched cell engine (``finetune_cell``) against the per-run reference (``finetune``)."""
import copy

import numpy as np
import pytest
import torch

from trm_utils import finetune, train_source
from trm_utils.batched import EncoderCache, encode, encoder_bytes_per_slice
from trm_utils.losses import METHODS
from trm_utils.train import finetune_cell

from .test_unet_train import small_unet, toy_data

ITERS = 20
#: every method in its default (dataset-level map) reading, and the map methods in the per-image reading
VARIANTS = [(m, {}) for m in sorted(METHODS)] + [(m, {"reading": "image"}) for m in ("exp_only", "trm")]


@pytest.fixture(scope="module")
def cell():
    """A trained 2-class source and a 3-class target (so every run re-initialises its head)."""
    data = toy_data(n=20, classes=3)
    src = small_unet(2, seed=1)
    train_source(src, toy_data(n=16, seed=5), iterations=10, batch_size=4, show_progress=False)
    runs = [(m, s, o) for m, o in VARIANTS for s in (0, 1)]
    before = copy.deepcopy(src.state_dict())
    hist, models = finetune_cell(src, data, runs, iterations=ITERS, lr=1e-3, batch_size=4, eval_data=data,
                                 eval_every=10, show_progress=False, return_models=True)
    return {"data": data, "src": src, "runs": runs, "hist": hist, "models": models, "before": before}


def _reference(cell, method, seed, **kw):
    model = copy.deepcopy(cell["src"])
    hist = finetune(model, cell["data"], method, iterations=ITERS, lr=1e-3, batch_size=4, eval_data=cell["data"],
                    eval_every=10, seed=seed, show_progress=False, **kw)
    return model, hist


@pytest.mark.parametrize("method,opts", VARIANTS, ids=[m + ("@map=image" if o else "") for m, o in VARIANTS])
def test_batched_equals_per_run(cell, method, opts):
    for seed in (0, 1):
        k = cell["runs"].index((method, seed, opts))
        ref_model, ref = _reference(cell, method, seed, **opts)
        got, model = cell["hist"][k], cell["models"][k]
        assert got["method"] == method and got["seed"] == seed and len(got["loss"]) == ITERS
        assert got["reading"] == opts.get("reading", "dataset")
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-4)
        ref_sd, sd = ref_model.state_dict(), model.state_dict()
        assert ref_sd.keys() == sd.keys()
        for name in ref_sd:
            if name.startswith("encoder."):
                assert torch.equal(ref_sd[name], sd[name]), f"encoder {name} changed"
            else:  # decoder and head weights, BatchNorm running statistics
                torch.testing.assert_close(sd[name].float(), ref_sd[name].float(), rtol=1e-4, atol=1e-5, msg=name)
        assert [e["iteration"] for e in got["eval"]] == [e["iteration"] for e in ref["eval"]] == [10, 20]
        np.testing.assert_allclose([e["dice"] for e in got["eval"]], [e["dice"] for e in ref["eval"]], atol=1e-6)


def test_source_and_encoder_untouched(cell):
    for name, t in cell["src"].state_dict().items():
        assert torch.equal(t, cell["before"][name]), f"the source's {name} changed"
    for m in cell["models"]:
        for name, t in m.encoder.state_dict().items():
            assert torch.equal(t, cell["before"][f"encoder.{name}"]), f"encoder {name} changed"


def test_seeds_differ_and_histories_carry_timing(cell):
    h = cell["hist"]
    assert h[0]["loss"] != h[1]["loss"]  # same method, seeds 0 and 1: different batches and heads
    runs = cell["runs"]
    a, b = runs.index(("trm", 0, {})), runs.index(("trm", 0, {"reading": "image"}))
    assert h[a]["loss"][0] != pytest.approx(h[b]["loss"][0], rel=1e-3)  # the two readings weigh pixels differently
    assert all(x["cell_seconds"] > 0 and x["encoder_cached"] and x["precision"] == "fp32" for x in h)


def test_refresh_uses_each_runs_own_model(cell):
    runs = [("trm", 0, {"refresh_every": 5}), ("trs_map", 1, {"refresh_every": 5}), ("vanilla", 0),
            ("trm", 1, {"refresh_every": 5, "reading": "image"})]
    hist = finetune_cell(cell["src"], cell["data"], runs, iterations=ITERS, lr=1e-3, batch_size=4,
                         show_progress=False)
    for (method, seed, *opts), got in zip(runs, hist):
        _, ref = _reference(cell, method, seed, **(opts[0] if opts else {}))
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-4)
        assert len(got["refresh_seconds"]) == len(ref["refresh_seconds"])
    assert len(hist[0]["refresh_seconds"]) == 3 and not hist[2]["refresh_seconds"]  # at 5, 10, 15
    assert len(hist[3]["refresh_seconds"]) == 3


def test_recomputing_the_encoder_past_the_budget_gives_the_same_results(cell):
    runs = [("trm", 0), ("class_weight", 1)]
    kw = dict(iterations=8, lr=1e-3, batch_size=4, eval_data=cell["data"], eval_every=4, show_progress=False)
    cached = finetune_cell(cell["src"], cell["data"], runs, **kw)
    recomputed = finetune_cell(cell["src"], cell["data"], runs, cache_budget_mb=0, **kw)
    assert cached[0]["encoder_cached"] and not recomputed[0]["encoder_cached"]
    for a, b in zip(cached, recomputed):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert [e["dice"] for e in a["eval"]] == pytest.approx([e["dice"] for e in b["eval"]], abs=1e-6)


def test_encoder_cache_matches_the_forward_pass(cell):
    src = copy.deepcopy(cell["src"]).eval()
    images = cell["data"][0]
    cache = EncoderCache(src, images, torch.device("cpu"), cached=True, channels_last=True)
    idx = torch.tensor([3, 0, 3])
    for a, b in zip(cache.get(idx), encode(src, images[idx])):
        torch.testing.assert_close(a, b)
    assert encoder_bytes_per_slice(src, 16, 16) == sum(lv[0].numel() * 4 for lv in cache.levels)


def test_bf16_runs_and_is_recorded(cell):
    hist = finetune_cell(cell["src"], cell["data"], [("trm", 0)], iterations=5, lr=1e-3, batch_size=4,
                         precision="bf16", show_progress=False)
    assert hist[0]["precision"] == "bf16" and all(np.isfinite(hist[0]["loss"]))


@pytest.mark.parametrize("runs,match", [
    ([], "runs is empty"),
    ([("nope", 0)], "unknown method 'nope'"),
    ([("trm", -1)], "seed must be a non-negative integer"),
    ([("trm", 0, {"lr": 1})], "unknown run options"),
])
def test_bad_runs_are_refused(cell, runs, match):
    with pytest.raises(ValueError, match=match):
        finetune_cell(cell["src"], cell["data"], runs, iterations=1, show_progress=False)


def test_bad_precision_refused(cell):
    with pytest.raises(ValueError, match="precision must be"):
        finetune_cell(cell["src"], cell["data"], [("trm", 0)], iterations=1, precision="fp8", show_progress=False)


def test_lr_decay_schedule_and_equivalence(cell):
    from trm_utils.train import lr_at

    assert [lr_at(i, 10, 1.0, None) for i in (1, 10)] == [1.0, 1.0]
    sched = [lr_at(i, 10, 1.0, 0.3) for i in range(1, 11)]
    assert sched[:7] == [1.0] * 7 and sched[7:] == pytest.approx([1.0, 2 / 3, 1 / 3])
    ref_model = copy.deepcopy(cell["src"])
    ref = finetune(ref_model, cell["data"], "trm", iterations=12, lr=1e-3, batch_size=4, seed=0, lr_decay=0.5,
                   show_progress=False)
    got = finetune_cell(cell["src"], cell["data"], [("trm", 0)], iterations=12, lr=1e-3, batch_size=4, lr_decay=0.5,
                        show_progress=False)[0]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-4)
    plain = finetune_cell(cell["src"], cell["data"], [("trm", 0)], iterations=12, lr=1e-3, batch_size=4,
                          show_progress=False)[0]
    assert plain["loss"][:7] == pytest.approx(got["loss"][:7], rel=1e-5) and plain["loss"][-1] != got["loss"][-1]
