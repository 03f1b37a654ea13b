"""Hardness (eq. 5), risk map (eq. 6), the weighted losses (eq. 7 and baselines), Dice."""
import math

import pytest
import torch
import torch.nn.functional as F

from trm_utils import (METHODS, class_weights, dice_per_class, hardness, mean_foreground_dice, method_loss,
                       risk_map, weighted_cross_entropy)


def test_hardness_extremes_and_range():
    tmap = -torch.rand(3, 8, 9) * 5
    h = hardness(tmap)
    for i in range(3):
        assert h[i].reshape(-1)[tmap[i].argmin()].item() == pytest.approx(1.0)  # least transferable
        assert h[i].reshape(-1)[tmap[i].argmax()].item() == pytest.approx(0.0)  # most transferable
    assert h.min() >= 0 and h.max() <= 1


def test_hardness_is_per_image():
    tmap = torch.stack([torch.linspace(-1, 0, 16).reshape(4, 4), torch.linspace(-100, -50, 16).reshape(4, 4)])
    h = hardness(tmap)
    assert torch.allclose(h[0], h[1], atol=1e-6)


def test_constant_map_gives_risk_one():
    tmap = torch.full((2, 5, 5), -0.3)
    assert (hardness(tmap) == 0).all()
    assert (risk_map(tmap) == 1).all()


@pytest.mark.parametrize("base", [2.0, 10.0, math.e])
def test_risk_map_range(base):
    tmap = -torch.rand(2, 6, 6) * 3
    r = risk_map(tmap, base)
    assert r.min().item() == pytest.approx(1.0) and r.max().item() == pytest.approx(base, rel=1e-5)
    assert torch.allclose(r, base ** hardness(tmap))


def test_risk_refuses_nan_and_bad_base():
    with pytest.raises(ValueError, match="NaN"):
        risk_map(torch.tensor([[[float("nan")]]]))
    with pytest.raises(ValueError, match="base"):
        risk_map(-torch.rand(1, 2, 2), base=0.5)


def small_batch():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 1.0]]]])  # B=1, C=2, H=1, W=2
    labels = torch.tensor([[[0, 1]]])
    # pixel 0: logits (2, 0), label 0 -> -log softmax_0 = log(1 + e^{-2})
    # pixel 1: logits (-1, 1), label 1 -> log(1 + e^{-2})
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-2.0))]
    return logits, labels, ce


def test_weighted_ce_hand_computed():
    logits, labels, ce = small_batch()
    w = torch.tensor([[[1.0, 3.0]]])
    assert weighted_cross_entropy(logits, labels).item() == pytest.approx(sum(ce) / 2)
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx((ce[0] + 3 * ce[1]) / 2)
    # eq. (7): divided by the single foreground pixel
    assert weighted_cross_entropy(logits, labels, w, "foreground").item() == pytest.approx(ce[0] + 3 * ce[1])
    assert weighted_cross_entropy(logits, labels, w, "weights").item() == pytest.approx((ce[0] + 3 * ce[1]) / 4)


def test_no_foreground_batch_is_normalised_by_pixel_count():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    loss = weighted_cross_entropy(logits, labels, normalize="foreground")
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_class_weights_inverse_frequency_matches_pytorch():
    cw = class_weights([90, 10])
    assert cw.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert class_weights([5, 5, 5]).tolist() == pytest.approx([1, 1, 1])
    assert class_weights([5, 0, 5]).tolist() == pytest.approx([1, 0, 1])
    logits, labels = torch.randn(2, 2, 5, 5), torch.randint(0, 2, (2, 5, 5))
    ours = method_loss("class_weight", logits, labels, class_weight=cw)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, labels, weight=cw).item(), rel=1e-6)
    with pytest.raises(ValueError, match="all zero"):
        class_weights([0, 0])


def test_method_registry_matches_design_table():
    logits, labels, ce = small_batch()
    h = torch.tensor([[[0.0, 1.0]]])
    t = torch.tensor([[[-0.1, -0.6]]])  # a transferability map: [22]'s weight is exp(-T)
    expect = {
        "vanilla": sum(ce) / 2,
        "trs_map": (math.exp(0.1) * ce[0] + math.exp(0.6) * ce[1]) / 2,
        "trm": (1 * ce[0] + 10 * ce[1]) / 1,
        "fg_only": sum(ce) / 1,
        "exp_only": (1 * ce[0] + 10 * ce[1]) / 2,
    }
    assert set(METHODS) == set(expect) | {"class_weight"}
    for name, value in expect.items():
        assert method_loss(name, logits, labels, hardness=h, tmap=t).item() == pytest.approx(value), name
    with pytest.raises(ValueError, match="needs the hardness"):
        method_loss("trm", logits, labels)
    with pytest.raises(ValueError, match="needs the transferability map T"):
        method_loss("trs_map", logits, labels, hardness=h)
    with pytest.raises(ValueError, match="unknown method"):
        method_loss("focal", logits, labels)


def test_dice_convention():
    pred = torch.tensor([0, 1, 1, 2, 0, 0])
    target = torch.tensor([0, 1, 2, 2, 0, 0])
    d = dice_per_class(pred, target, 4)
    assert d[1].item() == pytest.approx(2 * 1 / 3)
    assert d[2].item() == pytest.approx(2 * 1 / 3)
    assert math.isnan(d[3].item())  # absent from both: undefined, skipped by the mean
    assert mean_foreground_dice(pred, target, 4) == pytest.approx(2 / 3)
    assert dice_per_class(torch.tensor([1]), torch.tensor([0]), 2)[1].item() == 0.0  # only in pred: 0
    assert math.isnan(mean_foreground_dice(torch.zeros(4), torch.zeros(4), 2))
    with pytest.raises(ValueError, match="outside"):
        dice_per_class(torch.tensor([5]), torch.tensor([0]), 2)


def test_trs_map_is_defined_on_the_dataset_reading_only():
    from trm_utils.losses import check_method_reading

    check_method_reading("trs_map", "dataset")
    check_method_reading("trm", "image")
    check_method_reading("vanilla", "image")
    with pytest.raises(ValueError, match="exp\\(-T\\) of the dataset-level map"):
        check_method_reading("trs_map", "image")
    with pytest.raises(ValueError, match="unknown map reading"):
        check_method_reading("trm", "pixel")


def test_source_losses():
    """Cross-entropy + soft Dice (the tumour sources' pre-training loss) against a hand computation."""
    from trm_utils.losses import SOURCE_LOSSES, soft_dice_loss, source_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    p = logits.softmax(1)
    dice = []
    for c in (1, 2):
        inter = (p[:, c] * (labels == c)).sum()
        dice.append((2 * inter + 1) / (p[:, c].sum() + (labels == c).sum() + 1))
    expected = 1 - (dice[0] + dice[1]) / 2
    assert soft_dice_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert source_loss(logits, labels, "ce").item() == pytest.approx(ce.item())
    assert source_loss(logits, labels, "ce_dice").item() == pytest.approx(ce.item() + expected.item(), rel=1e-6)
    # a perfect prediction has Dice loss near 0
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, labels).item() < 1e-3
    assert SOURCE_LOSSES == ("ce", "ce_dice")
    with pytest.raises(ValueError, match="source loss must be one of"):
        source_loss(logits, labels, "dice")
