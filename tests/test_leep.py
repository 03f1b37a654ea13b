"""LEEP (eq. 2), pixel-LEEP (eq. 3) and transferability maps (eq. 4)."""
import math

import numpy as np
import pytest
import torch

from trm_utils import PixelLEEP, leep, pixel_leep, transferability_map


def leep_by_loops(theta, y):
    """Eq. (2) transcribed literally, one loop per sum (the reference for the vectorised code)."""
    n, c_s = theta.shape
    c_t = int(y.max()) + 1
    joint = [[0.0] * c_s for _ in range(c_t)]
    for i in range(n):
        for z in range(c_s):
            joint[y[i]][z] += theta[i][z] / n
    pz = [sum(joint[yy][z] for yy in range(c_t)) for z in range(c_s)]
    total = 0.0
    for i in range(n):
        eep = sum(joint[y[i]][z] / pz[z] * theta[i][z] for z in range(c_s) if pz[z] > 0)
        total += math.log(eep)
    return total / n


def random_probs(rng, shape, axis):
    logits = rng.normal(size=shape) * 2
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("n,c_s,c_t", [(7, 2, 2), (50, 5, 3), (200, 10, 4), (31, 3, 6)])
def test_leep_matches_loop_transcription(n, c_s, c_t):
    rng = np.random.default_rng(n + c_s + c_t)
    theta = random_probs(rng, (n, c_s), 1)
    y = rng.integers(0, c_t, n)
    y[:c_t] = np.arange(c_t)
    assert leep(theta, y) == pytest.approx(leep_by_loops(theta, y), abs=1e-6)
    assert leep(torch.tensor(theta), torch.tensor(y)) == pytest.approx(leep_by_loops(theta, y), abs=1e-6)


def test_leep_nonpositive_and_permutation_invariant():
    rng = np.random.default_rng(0)
    theta = random_probs(rng, (100, 6), 1)
    y = rng.integers(0, 3, 100)
    score = leep(theta, y)
    assert score <= 0
    perm = rng.permutation(6)
    assert leep(theta[:, perm], y) == pytest.approx(score, abs=1e-12)


def test_leep_is_zero_when_source_determines_target():
    z = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    theta = np.eye(4)[z]
    y = np.array([0, 1, 1, 0, 0, 1, 1, 0])  # y is a function of z
    assert leep(theta, y) == pytest.approx(0.0, abs=1e-12)


def test_leep_better_source_scores_higher():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    informative = np.where(y[:, None] == np.arange(2), 0.9, 0.1)
    uninformative = np.full((500, 2), 0.5)
    assert leep(informative, y) > leep(uninformative, y)


def pixel_problem(seed=0, b=5, c_s=4, c_t=3, h=6, w=7):
    rng = np.random.default_rng(seed)
    probs = torch.tensor(random_probs(rng, (b, c_s, h, w), 1))
    labels = torch.tensor(rng.integers(0, c_t, (b, h, w)))
    labels[0, 0, :c_t] = torch.arange(c_t)
    return probs, labels


def test_pixel_leep_equals_leep_on_flattened_pixels():
    probs, labels = pixel_problem()
    flat_p = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    assert pixel_leep(probs, labels) == pytest.approx(leep(flat_p, labels.reshape(-1)), abs=1e-10)


def test_streaming_over_uneven_batches_equals_one_call():
    probs, labels = pixel_problem(seed=3, b=9)
    est = PixelLEEP(4, 3)
    splits = [0, 1, 4, 5, 9]
    for a, b in zip(splits[:-1], splits[1:]):
        est.update(probs[a:b], labels[a:b])
    maps = [est.score_update(probs[a:b], labels[a:b]) for a, b in zip(splits[:-1], splits[1:])]
    assert est.score() == pytest.approx(pixel_leep(probs, labels), abs=1e-10)
    # the score is the mean of the transferability maps (eq. 3 vs eq. 4)
    assert torch.cat(maps).mean().item() == pytest.approx(est.score(), abs=1e-10)
    assert est.joint().sum().item() == pytest.approx(1.0)


def test_mask_excludes_exactly_the_masked_pixels():
    probs, labels = pixel_problem(seed=5)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, 1:4, 2:6] = True
    flat_p = probs.permute(0, 2, 3, 1)[mask]
    score = pixel_leep(probs, labels, mask)
    assert score == pytest.approx(leep(flat_p, labels[mask], num_target_classes=3), abs=1e-10)
    # changing masked-out pixels does not move the score
    probs2 = probs.clone()
    probs2[:, :, 0, 0] = torch.tensor([1.0, 0, 0, 0], dtype=probs.dtype)
    assert pixel_leep(probs2, labels, mask) == pytest.approx(score, abs=1e-12)


def test_transferability_map_values():
    probs, labels = pixel_problem(seed=7)
    est = PixelLEEP(4, 3).update(probs, labels)
    cond = est.conditional()
    tmap = transferability_map(probs, labels, cond)
    assert tmap.shape == labels.shape
    assert (tmap <= 1e-12).all()
    b, p, q = 2, 3, 4
    expected = math.log(sum(cond[labels[b, p, q], z].item() * probs[b, z, p, q].item() for z in range(4)))
    assert tmap[b, p, q].item() == pytest.approx(expected, abs=1e-10)
    # columns of P(y|z) sum to 1 over y
    assert torch.allclose(cond.sum(0), torch.ones(4, dtype=cond.dtype))


def test_memory_state_does_not_grow():
    probs, labels = pixel_problem(seed=2)
    est = PixelLEEP(4, 3)
    for _ in range(20):
        est.update(probs, labels)
    state = [v for v in vars(est).values() if isinstance(v, torch.Tensor)]
    assert all(t.numel() <= 4 * 3 for t in state)


# --- edge cases: finite numbers -------------------------------------------------------

def test_source_label_never_predicted_is_finite():
    probs, labels = pixel_problem(seed=4, c_s=5)
    probs[:, 4] = 0.0  # source label 4 never predicted
    probs = probs / probs.sum(1, keepdim=True)
    est = PixelLEEP(5, 3).update(probs, labels)
    assert torch.isfinite(est.conditional()).all()
    assert (est.conditional()[:, 4] == 0).all()
    assert math.isfinite(pixel_leep(probs, labels))


def test_target_with_one_class_scores_zero():
    probs, _ = pixel_problem(seed=6)
    labels = torch.zeros(probs.shape[0], *probs.shape[2:], dtype=torch.long)
    assert pixel_leep(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_impossible_label_is_clamped_not_inf():
    probs = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    probs[:, 0] = 1.0  # the source always says z=0
    labels = torch.tensor([[[0, 1], [0, 1]]])
    cond = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # y=1 only ever from z=1
    tmap = transferability_map(probs, labels, cond)
    assert torch.isfinite(tmap).all() and tmap.min() == pytest.approx(math.log(1e-12))


def test_score_without_second_pass_is_refused():
    probs, labels = pixel_problem()
    est = PixelLEEP(4, 3).update(probs, labels)
    with pytest.raises(RuntimeError, match="second pass"):
        est.score()


# --- bad input: one-line ValueError naming the problem --------------------------------

@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda p, y: (p, y[:, :-1]), "does not match"),
        (lambda p, y: (p, y + 3), "outside"),
        (lambda p, y: (p * 2, y), "apply softmax"),
        (lambda p, y: (torch.where(p > 0.5, torch.nan, p), y), "NaN or Inf"),
        (lambda p, y: (p, y - 1), "negative"),
    ],
)
def test_bad_input_is_refused(mutate, match):
    probs, labels = pixel_problem()
    p, y = mutate(probs.clone(), labels.clone())
    with pytest.raises(ValueError, match=match) as err:
        est = PixelLEEP(4, 3)
        est.update(p, y)
    assert "\n" not in str(err.value)


def test_leep_bad_input():
    with pytest.raises(ValueError, match="does not match"):
        leep(np.full((4, 2), 0.5), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="apply softmax"):
        leep(np.ones((4, 2)), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        leep(np.array([[np.inf, 0.0]]), np.array([0]))
