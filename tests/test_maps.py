"""Transferability maps in both readings (eq. 4), against a direct loop transcription of [22]'s
patch LEEP; hardness of a dataset-level map; the maps from a model; variance explained."""
import math

import numpy as np
import pytest
import torch

from trm_utils import PatchLEEP, dataset_transferability_map, leep, transferability_maps, variance_explained
from trm_utils.leep import PixelLEEP
from trm_utils.maps import LossMaps, hardness, loss_maps, to_pixels, transferability_map

from .test_unet_train import small_unet, toy_data


def patch_leep_loop(probs: np.ndarray, labels: np.ndarray, patch: int) -> np.ndarray:
    """[22]'s ``compute_pixel_transferability`` (metric LEEP, stride = patch) transcribed as plain
    loops: for every patch position, the LEEP (eq. 2) of the patch's pixels over all images, with
    P(y|z) from those pixels alone and a never-predicted z skipped. The last row / column of
    patches covers what is left when the size is not a multiple of the patch (the kit's rule;
    [22]'s code drops those pixels), so this loop also checks that rule."""
    n, c_s, h, w = probs.shape
    rows, cols = math.ceil(h / patch), math.ceil(w / patch)
    out = np.zeros((rows, cols))
    for a in range(rows):
        for b in range(cols):
            xs, ys = [], []
            for i in range(n):
                for u in range(a * patch, min(h, (a + 1) * patch)):
                    for v in range(b * patch, min(w, (b + 1) * patch)):
                        xs.append(probs[i, :, u, v])
                        ys.append(labels[i, u, v])
            c_y = max(ys) + 1
            p_yz, p_z = np.zeros((c_y, c_s)), np.zeros(c_s)
            for x, y in zip(xs, ys):
                p_z += x
                p_yz[y] += x
            p_z /= len(xs)
            p_yz /= len(xs)
            cond = np.zeros((c_y, c_s))
            for z in range(c_s):
                if p_z[z] == 0:
                    continue
                cond[:, z] = p_yz[:, z] / p_z[z]
            total = 0.0
            for x, y in zip(xs, ys):
                total += math.log(sum(cond[y, z] * x[z] for z in range(c_s)))
            out[a, b] = total / len(xs)
    return out


def random_case(n=4, c_s=3, c_t=4, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c_s, h, w, generator=g, dtype=torch.float64) * 2, dim=1)
    labels = torch.randint(0, c_t, (n, h, w), generator=g)
    return probs, labels


@pytest.mark.parametrize("patch,c_s,c_t", [(1, 2, 2), (2, 3, 4), (4, 4, 4), (4, 2, 3)])
def test_dataset_map_equals_the_loop_transcription_of_22(patch, c_s, c_t):
    probs, labels = random_case(n=3, c_s=c_s, c_t=c_t, h=8, w=12, seed=patch * 10 + c_s)
    got = dataset_transferability_map(probs, labels, patch=patch, num_target_classes=c_t)
    ref = patch_leep_loop(probs.numpy(), labels.numpy(), patch)
    assert got.shape == (8 // patch, 12 // patch)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_never_predicted_source_label_and_pure_background_region():
    probs, labels = random_case(n=3, c_s=3, c_t=3, h=8, w=8, seed=3)
    probs[:, 2, :4] = 0.0  # source label 2 predicted nowhere in the top half
    probs = probs / probs.sum(1, keepdim=True)
    labels[:, :, 4:] = 0  # the right half is pure background in every image
    for patch in (1, 2, 4):
        got = dataset_transferability_map(probs, labels, patch=patch)
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.double().numpy(), patch_leep_loop(probs.numpy(), labels.numpy(), patch),
                                   rtol=1e-5, atol=1e-6)
        right = got[:, (4 // patch):]
        assert right.abs().max() < 1e-6  # one label in the patch: T = log(sum_z theta_z) = 0 up to rounding


def test_size_not_a_multiple_of_the_patch_gives_smaller_edge_patches():
    probs, labels = random_case(n=2, c_s=2, c_t=3, h=10, w=7, seed=4)
    got = dataset_transferability_map(probs, labels, patch=4)
    assert got.shape == (3, 2)  # ceil(10 / 4) x ceil(7 / 4)
    np.testing.assert_allclose(got.double().numpy(), patch_leep_loop(probs.numpy(), labels.numpy(), 4),
                               rtol=1e-5, atol=1e-6)
    pix = to_pixels(got, 4, (10, 7))
    assert pix.shape == (10, 7) and pix[9, 6] == got[2, 1] and pix[3, 3] == got[0, 0]


def test_patch_one_is_the_leep_of_each_pixel_coordinate_over_the_images():
    probs, labels = random_case(n=6, c_s=3, c_t=3, h=4, w=5, seed=5)
    got = dataset_transferability_map(probs, labels, patch=1, num_target_classes=3)
    for u, v in [(0, 0), (2, 3), (3, 4)]:
        ref = leep(probs[:, :, u, v], labels[:, u, v])
        assert got[u, v].item() == pytest.approx(ref, abs=1e-6)


def test_streamed_in_uneven_batches_equals_one_call():
    probs, labels = random_case(n=7, c_s=3, c_t=4, h=8, w=8, seed=6)
    est = PatchLEEP(3, 4, patch=2)
    batches = [slice(0, 2), slice(2, 3), slice(3, 7)]
    for b in batches:
        est.update(probs[b], labels[b])
    for b in batches:
        est.score_update(probs[b], labels[b])
    torch.testing.assert_close(est.map(), dataset_transferability_map(probs, labels, patch=2, num_target_classes=4))
    # the global score is the mean of the map when every patch is full
    assert est.score() == pytest.approx(float(est.map().double().mean()), abs=1e-6)


def test_mask_leaves_pixels_out():
    probs, labels = random_case(n=4, c_s=2, c_t=3, h=6, w=6, seed=7)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    mask[0] = False  # image 0 does not count
    est = PatchLEEP(2, 3, patch=1)
    est.update(probs, labels, mask)
    est.score_update(probs, labels, mask)
    torch.testing.assert_close(est.map(), dataset_transferability_map(probs[1:], labels[1:], 1, 3))


def test_dataset_map_lies_between_minus_log_ct_and_zero():
    """Each entry is a LEEP, bounded below by minus the entropy of the patch's labels, so [22]'s
    weight exp(-T) lies in [1, C_t]."""
    for seed in range(3):
        probs, labels = random_case(n=5, c_s=4, c_t=4, h=8, w=8, seed=seed)
        t = dataset_transferability_map(probs, labels, patch=2)
        assert (t <= 1e-6).all() and (t >= -math.log(4) - 1e-6).all()


def test_bad_inputs_are_refused():
    probs, labels = random_case()
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        dataset_transferability_map(probs, labels, patch=0)
    est = PatchLEEP(3, 4)
    est.update(probs, labels)
    with pytest.raises(ValueError, match="one size"):
        est.update(probs[:, :, :4], labels[:, :4])
    with pytest.raises(RuntimeError, match="second pass"):
        est.map()


def test_hardness_of_a_dataset_map_is_min_max_over_its_entries():
    t = torch.tensor([[-2.0, -1.0], [0.0, -0.5]])
    torch.testing.assert_close(hardness(t), torch.tensor([[1.0, 0.5], [0.0, 0.25]]))
    assert torch.equal(hardness(torch.zeros(3, 3)), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="H x W"):
        hardness(torch.zeros(2))


def test_maps_from_a_model_in_both_readings():
    data = toy_data(n=6, classes=3, size=16)
    model = small_unet(2, seed=2)
    r = transferability_maps(model, data, patch=2, device="cpu")
    assert set(r) >= {"score", "dataset", "image", "patch", "n", "size"}
    images, labels = data
    with torch.no_grad():
        probs = torch.softmax(model.eval()(images), 1)
    ref_map = dataset_transferability_map(probs, labels, patch=2, num_target_classes=3)
    torch.testing.assert_close(r["dataset"]["map"], ref_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r["dataset"]["tmap"], to_pixels(ref_map, 2, (16, 16)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r["dataset"]["hardness"], hardness(r["dataset"]["tmap"]))
    est = PixelLEEP(probs.shape[1], 3).update(probs, labels)  # the per-image reading: eq. 4 with one global P(y|z)
    torch.testing.assert_close(r["image"]["tmap"], transferability_map(probs, labels, est.conditional()),
                               rtol=1e-5, atol=1e-6)
    assert r["score"] == pytest.approx(float(r["image"]["tmap"].mean()), rel=1e-5)
    lm = loss_maps(r, "dataset")
    t, h = lm.batch(torch.tensor([0, 3, 3]))
    assert t.shape == (3, 16, 16) and torch.equal(t[0], t[2]) and torch.equal(h[1], r["dataset"]["hardness"])
    ti, _ = loss_maps(r, "image").batch(torch.tensor([4]))
    torch.testing.assert_close(ti[0], r["image"]["tmap"][4])
    only = transferability_maps(model, data, readings=("image",), device="cpu")
    with pytest.raises(ValueError, match="not 'dataset'"):
        loss_maps(only, "dataset")
    with pytest.raises(ValueError, match="unknown map reading"):
        transferability_maps(model, data, readings=("slice",), device="cpu")
    with pytest.raises(ValueError, match="do not fit"):
        LossMaps("image", torch.zeros(2, 16, 16), torch.zeros(2, 16, 16), n=6)


def test_per_image_map_is_pixel_leeps_terms():
    probs, labels = random_case(n=2, c_s=2, c_t=2, h=4, w=4)
    est = PixelLEEP(2, 2).update(probs, labels)
    torch.testing.assert_close(transferability_map(probs, labels, est.conditional()), est.score_update(probs, labels))


def test_variance_explained():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 3, (500,), generator=g), torch.randint(0, 2, (500,), generator=g)
    values = (a * 2.0 + b).double()
    assert variance_explained(values, a, b) == pytest.approx(1.0)
    assert 0.0 < variance_explained(values, a) < 1.0
    noise = torch.randn(500, generator=g, dtype=torch.float64)
    assert variance_explained(noise, a, b) < 0.05
    mask = a == 0
    assert variance_explained(values, b, mask=mask) == pytest.approx(1.0)  # within a == 0, b decides
    assert math.isnan(variance_explained(torch.ones(10), torch.zeros(10)))
    with pytest.raises(ValueError, match="does not match"):
        variance_explained(values, a[:10])


def test_risk_share_counts_entries_above_the_risk_threshold():
    """R = 10 ** H exceeds 5 exactly where H > log10(5) = 0.699."""
    from trm_utils.maps import risk_share

    h = torch.tensor([[0.0, 0.69], [0.70, 1.0]])
    assert risk_share(h) == pytest.approx(0.5)
    assert risk_share(torch.zeros(4, 4)) == 0.0 and risk_share(torch.ones(3, 3)) == 1.0
    assert risk_share(h, above=1.5) == pytest.approx(0.75)  # 10 ** 0.69 = 4.9 > 1.5 too
