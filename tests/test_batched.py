"""The batched cell engine (``finetune_cell``) against the per-run reference (``finetune``)."""
import copy

import numpy as np
import pytest
import torch

from trm_utils import finetune, train_source
from trm_utils.batched import EncoderCache, encode, finetune_cell
from trm_utils.losses import METHODS
from trm_utils.memory import encoder_bytes_per_slice

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
            elif not sd[name].is_floating_point():  # BatchNorm's step counters
                assert torch.equal(sd[name], ref_sd[name]), name
            else:  # decoder and head weights, BatchNorm running statistics
                assert _drift(sd[name], ref_sd[name], cell["before"].get(name)) <= DRIFT_TOL, name
        assert [e["iteration"] for e in got["eval"]] == [e["iteration"] for e in ref["eval"]] == [10, 20]
        np.testing.assert_allclose([e["dice"] for e in got["eval"]], [e["dice"] for e in ref["eval"]], atol=1e-6)


#: How far the batched run may drift from the per-run reference, as a fraction of how far training
#: moved a tensor. The two paths sum in different orders (the batched engine adds the runs' losses
#: and convolves them as groups), and Adam divides each gradient by its running RMS, so rounding
#: differences can grow over the steps: on an AMD EPYC every run agreed to 1e-5 of its movement; on
#: an Intel Xeon (Sapphire Rapids) 15 of 16 did and one (trm, seed 0) drifted to 0.45 % from
#: iteration 10 on (losses still within 1e-5 relative). A wrong loss, weight or update moves a
#: tensor by the size of its movement (a drift near 1).
DRIFT_TOL = 0.02


def _drift(got, ref, start) -> float:
    """||got - ref|| over ||ref - start|| (over ||ref|| for a tensor with no start: a new head)."""
    got, ref = got.float(), ref.float()
    base = (ref - start.float()).norm() if start is not None and start.shape == ref.shape else ref.norm()
    return float((got - ref).norm() / base.clamp_min(1e-12))


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


def test_held_out_pass_cached_or_plain_gives_the_dice_evaluate_gives(cell):
    """The held-out pass from cached encoder outputs (the default) and from the encoder run again at
    every pass (cache_held_out=False) give every run the same Dice at every evaluation, and the last
    is what predict.evaluate (the plain pass: softmax, then argmax) gives the fine-tuned model."""
    from trm_utils import evaluate

    runs = [("trm", 0), ("vanilla", 1), ("class_weight", 0)]
    kw = dict(iterations=8, lr=1e-3, batch_size=4, eval_data=cell["data"], eval_every=3, show_progress=False)
    cached, models = finetune_cell(cell["src"], cell["data"], runs, return_models=True, **kw)
    plain = finetune_cell(cell["src"], cell["data"], runs, cache_held_out=False, **kw)
    assert cached[0]["encoder_cached"]
    for a, b, m in zip(cached, plain, models):
        assert [e["iteration"] for e in a["eval"]] == [3, 6, 8]
        assert [e["dice"] for e in a["eval"]] == [e["dice"] for e in b["eval"]]
        assert a["eval"][-1]["dice"] == pytest.approx(evaluate(m, cell["data"], device="cpu")["dice"], abs=1e-9)


def test_memory_layout_rule_and_both_layouts_agree(cell):
    """channels_last="auto" follows batched.use_channels_last (narrow U-Nets on the CPU only), and
    either layout gives the same runs up to float rounding."""
    from trm_utils.batched import CPU_CHANNELS_LAST_MAX_BASE, use_channels_last
    from trm_utils.unet import UNet2D

    cpu = torch.device("cpu")
    assert use_channels_last(UNet2D(1, 2, 8, 3), cpu) and not use_channels_last(UNet2D(1, 2, 64, 1), cpu)
    assert use_channels_last(UNet2D(1, 2, CPU_CHANNELS_LAST_MAX_BASE, 1), cpu)
    assert not use_channels_last(UNet2D(1, 2, 8, 3), torch.device("cuda"))
    runs = [("trm", 0), ("vanilla", 1)]
    kw = dict(iterations=8, lr=1e-3, batch_size=4, eval_data=cell["data"], eval_every=4, show_progress=False)
    auto = finetune_cell(cell["src"], cell["data"], runs, **kw)
    assert auto[0]["channels_last"] == use_channels_last(cell["src"], cpu)
    other = finetune_cell(cell["src"], cell["data"], runs, channels_last=not auto[0]["channels_last"], **kw)
    assert other[0]["channels_last"] != auto[0]["channels_last"]
    for a, b in zip(auto, other):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
        assert [e["dice"] for e in a["eval"]] == pytest.approx([e["dice"] for e in b["eval"]], abs=1e-3)


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


def test_grouping_gives_the_same_runs(cell):
    """Runs split into groups trained one after another get exactly what they get all together."""
    runs = [("trm", 0), ("vanilla", 1), ("class_weight", 0), ("trm", 1, {"reading": "image", "refresh_every": 4}),
            ("trs_map", 2)]
    kw = dict(iterations=8, lr=1e-3, batch_size=4, eval_data=cell["data"], eval_every=4, show_progress=False,
              return_models=True, lr_decay=0.5)
    ref, ref_models = finetune_cell(cell["src"], cell["data"], runs, group_size=len(runs), **kw)
    assert ref[0]["group_size"] == len(runs)
    for g in (1, 2, 3):
        got, models = finetune_cell(cell["src"], cell["data"], runs, group_size=g, **kw)
        assert got[0]["group_size"] == g and len(models) == len(runs)
        for a, b, ma, mb in zip(ref, got, ref_models, models):
            assert (a["method"], a["seed"]) == (b["method"], b["seed"])
            assert a["loss"] == b["loss"], f"group size {g}: {a['method']} seed {a['seed']} differs"
            assert [e["dice"] for e in a["eval"]] == [e["dice"] for e in b["eval"]]
            for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
                assert torch.equal(x, y), n


def test_group_size_auto_and_the_memory_budget(cell):
    from trm_utils.memory import cell_memory, plan_group_size

    src, data = cell["src"], cell["data"]
    runs = [("vanilla", s) for s in range(4)]
    kw = dict(iterations=2, lr=1e-3, batch_size=4, show_progress=False)
    assert finetune_cell(src, data, runs, **kw)[0]["group_size"] == 4  # small runs, plenty of memory: all together
    assert finetune_cell(src, data, runs, cache_budget_mb=0, **kw)[0]["group_size"] == 4
    # a budget that fits two runs but not three
    mem = lambda g: cell_memory(src, 16, 16, 4, g, 20, 3)  # noqa: E731
    budget_mb = (mem(2)["peak"] + mem(3)["peak"]) / 2 / 2**20
    assert finetune_cell(src, data, runs, memory_budget_mb=budget_mb, **kw)[0]["group_size"] == 2
    with pytest.raises(MemoryError, match=r"a group of 1 run\(s\) needs about .* MB but the memory budget is .*memory_budget_mb"):
        finetune_cell(src, data, runs, memory_budget_mb=mem(1)["peak"] / 2 / 2**20, **kw)
    with pytest.raises(MemoryError, match="lower group_size"):
        finetune_cell(src, data, runs, memory_budget_mb=budget_mb, group_size=3, **kw)
    with pytest.raises(ValueError, match="group_size must be"):
        plan_group_size(4, mem, 10**9, torch.device("cpu"), group_size=0)
    # on the CPU, runs whose step keeps more than CPU_GROUP_MAX_ACTIVATION_MB go one at a time (the measured
    # rule); on a GPU they are grouped as memory allows
    from trm_utils.unet import UNet2D

    paper = UNet2D(1, 4, 64, 4)
    pmem = lambda g: cell_memory(paper, 240, 240, 8, g, 0, 4, 100)  # noqa: E731
    assert pmem(1)["activations_per_run"] > 1000 * 2**20
    assert plan_group_size(12, pmem, 80 * 2**30, torch.device("cpu")) == 1
    assert plan_group_size(12, pmem, 80 * 2**30, torch.device("cuda")) == 12
    assert plan_group_size(12, pmem, 15 * 2**30, torch.device("cuda")) == 9
    with pytest.raises(ValueError, match="memory_budget_mb must be > 0"):
        finetune_cell(src, data, runs, memory_budget_mb=-1, **kw)


def test_memory_model_terms():
    """The model's terms, counted by hand for a depth-1 U-Net (base 2 channels, 4 x 4 px, 3 classes)."""
    from trm_utils.memory import backward_transient_bytes, cell_memory, param_bytes, step_activation_bytes
    from trm_utils.unet import UNet2D, freeze_encoder

    m = freeze_encoder(UNet2D(1, 3, base_channels=2, depth=1))
    # level 0: 2 channels x 16 px; bottleneck: 4 channels x 4 px; batch 5
    assert step_activation_bytes(m, 4, 4, 5, 3) == 4 * 5 * (6 * 2 * 16 + 4 * 4 + 3 * 3 * 16)
    assert backward_transient_bytes(m, 4, 4, 5) == 4 * 5 * 2 * 2 * 16
    dec = sum(p.numel() for p in m.parameters() if p.requires_grad) * 4
    assert param_bytes(m, trainable=True) == dec
    assert param_bytes(m) == sum(t.numel() * 4 for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]) \
        + sum(b.numel() * b.element_size() for b in m.buffers() if not b.is_floating_point())
    one, three = cell_memory(m, 4, 4, 5, 1, 10, 3), cell_memory(m, 4, 4, 5, 3, 10, 3)
    assert three["peak"] - one["peak"] == 2 * one["per_run"]
    assert one["per_run"] == param_bytes(m) + 3 * dec + step_activation_bytes(m, 4, 4, 5, 3)
    assert one["eval"] == 0 and one["peak"] == one["shared"] + one["per_run"] + backward_transient_bytes(m, 4, 4, 5)


@pytest.mark.parametrize("preset,groups", [("tutorial", (1, 4)), ("paper", (1, 2))])
def test_memory_model_within_20_percent_of_measured_peaks(preset, groups):
    """``cell_memory`` against the peak resident memory of a real cell in a fresh process, at both
    presets' U-Net and image size (the paper's: base 64, 240 px, batch 8; about 2 and 3.5 GB)."""
    from benchmarks.memory_model import measure

    for g in groups:
        r = measure(preset, g)
        assert 0.8 <= r["ratio"] <= 1.2, f"measured {r['measured_mb']:.0f} MB, predicted {r['predicted_mb']:.0f} MB: {r}"
