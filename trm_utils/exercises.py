"""Exercises that check themselves, in the style of Kaggle's learntools.

Each notebook ends with a few checked exercises about its own idea::

    from trm_utils.exercises import nb01
    answer = None          # your answer here
    nb01.q1.check(answer)  # "not attempted", what is wrong, or "correct"
    nb01.q1.hint()
    nb01.q1.solution()

An unanswered exercise (``None`` or ``...``) prints "not attempted" and never fails a headless
run; a wrong answer gets a message that says what is wrong (type, shape, which values and by how
much); a right one says so. ``Exercise.evaluate`` returns ``(status, message)`` without printing,
for the tests. Every exercise computes its expected answer with the kit's own functions, on the
small problem its prompt states, so the checks test the idea, not a number typed in here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from . import budget as B
from . import tables as TB
from .leep import leep, pixel_leep
from .losses import method_loss, weighted_cross_entropy
from .maps import dataset_transferability_map, hardness, risk_map
from .report import TIE

NOT_ATTEMPTED, CORRECT, INCORRECT = "not attempted", "correct", "incorrect"


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def compare_number(answer, expected: float, rtol: float = 1e-3, atol: float = 1e-4) -> str | None:
    """None when ``answer`` is the number ``expected`` (within tolerance), else what is wrong."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, (int, float, np.integer, np.floating)):
        return f"expected a number, got {type(answer).__name__} {answer!r}"
    if not math.isfinite(float(answer)):
        return f"expected a finite number, got {answer}"
    diff = abs(float(answer) - expected)
    if diff > atol + rtol * abs(expected):
        return f"{float(answer):.6g} is off by {diff:.3g} (relative {diff / max(abs(expected), 1e-12):.2%})"
    return None


def compare_array(answer, expected, rtol: float = 1e-3, atol: float = 1e-4) -> str | None:
    """None when ``answer`` equals the array ``expected`` (within tolerance), else what is wrong,
    in the manner of ``torch.testing.assert_close``: shape, then the mismatched elements."""
    try:
        a = _as_array(answer)
    except (TypeError, ValueError):
        return f"expected an array of shape {tuple(np.shape(expected))}, got {type(answer).__name__}"
    e = _as_array(expected)
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    if not np.isfinite(a).all():
        return f"{int((~np.isfinite(a)).sum())} of {a.size} elements are NaN or Inf"
    bad = np.abs(a - e) > atol + rtol * np.abs(e)
    if bad.any():
        i = np.unravel_index(np.argmax(np.abs(a - e)), a.shape)
        return (f"{int(bad.sum())} of {a.size} elements differ; the greatest difference is {abs(a[i] - e[i]):.3g} "
                f"at index {tuple(int(k) for k in i)} ({a[i]:.6g} where {e[i]:.6g} was expected)")
    return None


def compare_exact(answer, expected) -> str | None:
    if isinstance(expected, bool):
        if not isinstance(answer, (bool, np.bool_)):
            return f"expected True or False, got {type(answer).__name__} {answer!r}"
        return None if bool(answer) == expected else f"{answer} is not right"
    if isinstance(expected, str):
        if not isinstance(answer, str):
            return f"expected one of the names in the question (a string), got {type(answer).__name__}"
        return None if answer.strip().lower() == expected.lower() else f"{answer!r} is not right"
    if isinstance(expected, (tuple, list)):
        if not isinstance(answer, (tuple, list)) or len(answer) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {answer!r}"
        wrong = [k for k, (a, e) in enumerate(zip(answer, expected)) if a != e]
        return None if not wrong else f"entries {wrong} are not right (got {tuple(answer)})"
    if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, (int, np.integer)):
        return f"expected a whole number, got {type(answer).__name__} {answer!r}"
    return None if int(answer) == expected else f"{int(answer)} is not right"


@dataclass
class Exercise:
    """One checked exercise: ``check(answer)``, ``hint()``, ``solution()``."""

    name: str
    prompt: str
    expected: Callable[[], Any]  # computes the reference answer with the kit's own functions
    compare: Callable[[Any, Any], str | None]
    hint_text: str
    solution_text: str

    def evaluate(self, answer) -> tuple:
        """``(status, message)`` for ``answer``; never raises on a wrong answer."""
        if answer is None or answer is Ellipsis:
            return NOT_ATTEMPTED, f"{self.name}: not attempted. Set your answer and run the check again " \
                                  f"(`{self.name}.hint()` for a hint)."
        try:
            problem = self.compare(answer, self.expected())
        except Exception as exc:  # an answer of a kind the comparison cannot read is wrong, not a crash
            problem = f"could not compare it ({type(exc).__name__}: {exc})"
        if problem is None:
            return CORRECT, f"{self.name}: correct."
        return INCORRECT, f"{self.name}: incorrect: {problem}. `{self.name}.hint()` gives a hint."

    def check(self, answer=None) -> str:
        status, message = self.evaluate(answer)
        print(message)
        return status

    def hint(self) -> None:
        print(f"{self.name} hint: {self.hint_text}")

    def solution(self) -> None:
        print(f"{self.name} solution:\n{self.solution_text}")

    def __repr__(self) -> str:
        return f"{self.name}: {self.prompt}"


def _number(rtol=1e-3, atol=1e-4):
    return lambda a, e: compare_number(a, e, rtol, atol)


def _array(rtol=1e-3, atol=1e-4):
    return lambda a, e: compare_array(a, e, rtol, atol)


# ----------------------------------------------------------------------------- the toy problems

#: notebook 01: five images, a 2-label source, a 2-class target
TOY_THETA = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]]
TOY_Y = [0, 0, 1, 1, 1]


def _toy_conditional():
    theta, y = torch.tensor(TOY_THETA, dtype=torch.float64), torch.tensor(TOY_Y)
    joint = torch.zeros(2, 2, dtype=torch.float64).index_add_(0, y, theta) / len(y)
    return joint / joint.sum(0, keepdim=True)


def _toy_leep():
    return leep(TOY_THETA, TOY_Y)


#: notebook 02: three 1 x 2 target images, a 2-label source
TOY_PROBS = [[[[0.9, 0.2]], [[0.1, 0.8]]], [[[0.7, 0.4]], [[0.3, 0.6]]], [[[0.6, 0.1]], [[0.4, 0.9]]]]
TOY_LABELS = [[[0, 1]], [[0, 0]], [[0, 1]]]


def _toy_pixel_leep():
    return pixel_leep(torch.tensor(TOY_PROBS, dtype=torch.float64), torch.tensor(TOY_LABELS))


def _toy_dataset_map():
    return dataset_transferability_map(torch.tensor(TOY_PROBS, dtype=torch.float64), torch.tensor(TOY_LABELS))


#: notebook 03: a small transferability map
TOY_T = [[-0.1, -0.4], [-0.9, -0.3]]


def _toy_hardness():
    return hardness(torch.tensor(TOY_T))


def _toy_risk():
    return float(risk_map(torch.tensor(TOY_T), base=10.0)[0, 1])


#: notebook 04: one image of 4 pixels, its per-pixel cross-entropy, labels and risk
TOY_CE = [0.2, 1.5, 0.7, 0.1]
TOY_LAB = [0, 1, 1, 0]
TOY_R = [1.0, 10.0, 3.0, 2.0]


def _toy_trm_loss():
    ce, lab = torch.tensor(TOY_CE, dtype=torch.float64), torch.tensor(TOY_LAB)
    # two-class logits whose cross-entropy at each pixel is TOY_CE: 0 for the pixel's label, and c for the
    # other class with log(1 + e^c) = CE, i.e. c = log(e^CE - 1)
    logits = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    logits[0, 1 - lab, 0, torch.arange(4)] = torch.log(torch.expm1(ce))
    risk = torch.tensor(TOY_R, dtype=torch.float64).reshape(1, 1, 4)
    return float(weighted_cross_entropy(logits, lab.reshape(1, 1, 4), risk, "foreground"))


def _trs_weight():
    # [22]'s weight at an entry T = -0.3: read it off method_loss on one pixel with CE 1 (a uniform 2-class logit
    # gives CE log 2), normalised by the single pixel
    logits = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    loss = method_loss("trs_map", logits, torch.zeros(1, 1, 1, dtype=torch.long), tmap=torch.full((1, 1, 1), -0.3))
    return float(loss) / math.log(2)


#: notebook 05: per-seed grid means of a few-shot setting
FEW_VANILLA = [0.71, 0.74, 0.69]
FEW_TRM = [0.73, 0.74, 0.72]


def _few_gain():
    v, t = np.mean(FEW_VANILLA), np.mean(FEW_TRM)
    return 100 * (t - v) / v


def _few_std():
    return float(np.std(FEW_TRM, ddof=1))


#: notebook 06: a held-out curve
TOY_CURVE = [(50, 0.60), (100, 0.70), (150, 0.76), (200, 0.78), (250, 0.75), (300, 0.74), (350, 0.745), (400, 0.74)]


def _toy_status():
    return B.run_status(TOY_CURVE)["status"]


#: notebook 07: per-cell Dice differences (TRM - vanilla) over a grid of 8 cells
TOY_DIFFS = [0.012, -0.004, 0.0005, 0.020, -0.0008, 0.003, -0.015, 0.0]


def _toy_wins():
    d = np.asarray(TOY_DIFFS)
    return (int((d > TIE).sum()), int((np.abs(d) <= TIE).sum()), int((d < -TIE).sum()))


def _paper_gain_table1():
    return float(TB.paper_gains("iseg2019").loc["ours", "gain_pct"])


# ----------------------------------------------------------------------------- per notebook

nb01 = SimpleNamespace(
    q1=Exercise("nb01.q1", "For the toy source outputs TOY_THETA (5 images x 2 source labels) and target labels TOY_Y, "
                "give the empirical conditional P(y | z) as a 2 x 2 array (rows y, columns z).",
                _toy_conditional, _array(),
                "P(y, z) = (1/n) sum over images with label y of theta_z; then divide each column by its sum P(z).",
                "theta, y = torch.tensor(TOY_THETA, dtype=torch.float64), torch.tensor(TOY_Y)\n"
                "joint = torch.zeros(2, 2, dtype=torch.float64).index_add_(0, y, theta) / len(y)\n"
                "answer = joint / joint.sum(0, keepdim=True)"),
    q2=Exercise("nb01.q2", "Compute the LEEP score (eq. 2) of the same toy problem by hand (a float).",
                _toy_leep, _number(),
                "For each image, the expected empirical predictor is sum_z P(y_i | z) theta_z; LEEP is the mean of its log.",
                "theta, y = np.array(TOY_THETA), np.array(TOY_Y)\n"
                "joint = np.stack([theta[y == k].sum(0) for k in (0, 1)]) / len(y)\n"
                "cond = joint / joint.sum(0)\n"
                "answer = float(np.mean([np.log(cond[yi] @ t) for t, yi in zip(theta, y)]))   # or leep(TOY_THETA, TOY_Y)"),
)

nb02 = SimpleNamespace(
    q1=Exercise("nb02.q1", "Three 1 x 2 target images (TOY_PROBS: 3 x 2 source labels x 1 x 2, TOY_LABELS: 3 x 1 x 2). "
                "Give their pixel-LEEP (eq. 3): every pixel of every image is one instance (a float).",
                _toy_pixel_leep, _number(),
                "Flatten the pixels into 6 instances (theta, y) and compute LEEP on them, as in notebook 01.",
                "probs, labels = torch.tensor(TOY_PROBS, dtype=torch.float64), torch.tensor(TOY_LABELS)\n"
                "answer = leep(probs.permute(0, 2, 3, 1).reshape(-1, 2), labels.reshape(-1))"),
    q2=Exercise("nb02.q2", "Give the dataset-level transferability map (eq. 4, patch 1) of the same three images: a 1 x 2 "
                "array, each entry the LEEP of that coordinate's 3 pixels with their own P(y | z).",
                _toy_dataset_map, _array(),
                "At coordinate (0, 0) every image has label 0: what is LEEP when one label is certain? At (0, 1), take "
                "the three pixels (theta, y) of that coordinate and compute their LEEP.",
                "p, y = torch.tensor(TOY_PROBS, dtype=torch.float64), torch.tensor(TOY_LABELS)\n"
                "answer = [[leep(p[:, :, 0, w], y[:, 0, w]) for w in range(2)]]   # or dataset_transferability_map(p, y)"),
)

nb03 = SimpleNamespace(
    q1=Exercise("nb03.q1", "Give the hardness (eq. 5) of the dataset-level map TOY_T = [[-0.1, -0.4], [-0.9, -0.3]] "
                "(a 2 x 2 array, 1 = hardest).",
                _toy_hardness, _array(),
                "H = (max T - T) / (max T - min T) over the map's four entries.",
                "T = torch.tensor(TOY_T)\nanswer = (T.max() - T) / (T.max() - T.min())"),
    q2=Exercise("nb03.q2", "What weight does the risk map (eq. 6, base 10) give the entry T = -0.4 of TOY_T?",
                _toy_risk, _number(),
                "Its hardness is (max T - T) / (max T - min T) = 0.375; R = 10 ** H.",
                "answer = 10 ** ((-0.1 - (-0.4)) / (-0.1 - (-0.9)))   # about 2.37"),
)

nb04 = SimpleNamespace(
    q1=Exercise("nb04.q1", "One image of 4 pixels: per-pixel cross-entropy TOY_CE = [0.2, 1.5, 0.7, 0.1], labels "
                "TOY_LAB = [0, 1, 1, 0], risk TOY_R = [1, 10, 3, 2]. Give the TRM loss (eq. 7).",
                _toy_trm_loss, _number(),
                "Sum R * CE over all pixels, background included; divide by the number of foreground pixels.",
                "answer = sum(r * c for r, c in zip(TOY_R, TOY_CE)) / sum(l != 0 for l in TOY_LAB)   # 17.5 / 2 = 8.75"),
    q2=Exercise("nb04.q2", "Trs map weighs pixels as [22]'s code does: what weight does it give a pixel where the "
                "dataset-level map is T = -0.3?",
                _trs_weight, _number(),
                "[22]'s `is_weight_map=True` turns each patch's LEEP into exp(-LEEP).",
                "answer = math.exp(0.3)   # about 1.35"),
)

nb05 = SimpleNamespace(
    q1=Exercise("nb05.q1", "Per-seed mean Dice over a few-shot setting: vanilla FEW_VANILLA = [0.71, 0.74, 0.69], TRM "
                "FEW_TRM = [0.73, 0.74, 0.72]. Give TRM's relative gain over vanilla in percent, as the paper "
                "computes it.", _few_gain, _number(),
                "100 x (mean TRM - mean vanilla) / mean vanilla, with the means over seeds.",
                "answer = 100 * (np.mean(FEW_TRM) - np.mean(FEW_VANILLA)) / np.mean(FEW_VANILLA)"),
    q2=Exercise("nb05.q2", "Give the spread over seeds of TRM's Dice the way the notebooks report it (a float).",
                _few_std, _number(),
                "The notebooks report the sample standard deviation over seeds (ddof=1).",
                "answer = np.std(FEW_TRM, ddof=1)"),
)

nb06 = SimpleNamespace(
    q1=Exercise("nb06.q1", "A sweep unit with methods vanilla, trs_map, trm and trm@map=image and seeds 0-4: how many "
                "fine-tuning runs does it train?", lambda: len([(m, s) for m in range(4) for s in range(5)]), compare_exact,
                "One run per method and seed, all trained together by finetune_cell.", "answer = 4 * 5"),
    q2=Exercise("nb06.q2", "What is the status of the held-out curve TOY_CURVE (iteration, Dice) by the run-status "
                "rule: 'flat', 'overfit' or 'rising'?",
                _toy_status, compare_exact,
                "Smooth the Dice by a running mean over 3 evaluations. Rising: the smoothed end exceeds the smoothed value "
                "at the start of the last third (the first evaluation at or after 2/3 of 400) by more than 0.01. Else "
                "overfit: the smoothed maximum exceeds the smoothed end by more than 0.02. Else flat.",
                "answer = B.run_status(TOY_CURVE)['status']   # smoothed: max 0.763 (at 250), 0.757 at 300, end 0.742: "
                "no rise, drop 0.022 > 0.02 -> 'overfit'"),
)

nb07 = SimpleNamespace(
    q1=Exercise("nb07.q1", "Per-cell Dice differences TRM - vanilla: TOY_DIFFS. With the report's tie threshold "
                "(|difference| <= 0.001), give (wins, ties, losses) for TRM.", _toy_wins, compare_exact,
                "A difference of exactly 0.001 or less in size is a tie.",
                "d = np.array(TOY_DIFFS)\nanswer = (int((d > 0.001).sum()), int((abs(d) <= 0.001).sum()), int((d < -0.001).sum()))"),
    q2=Exercise("nb07.q2", "From the paper's Table I (reference/table1_iseg2019.csv), give its relative gain of 'ours' "
                "over vanilla in percent, over all table cells (not the 'average' rows).", _paper_gain_table1,
                _number(rtol=1e-3, atol=1e-3),
                "Average the Dice of each method over all source-target cells, then 100 x (ours - vanilla) / vanilla.",
                "t = TB.paper_table('iseg2019'); t = t[t.source != 'average']\n"
                "m = t.groupby('method').dice.mean()\nanswer = 100 * (m['ours'] - m['vanilla']) / m['vanilla']   # about 1.8"),
)

#: what every solution's code may use (the notebooks import the same names)
SOLUTION_NAMESPACE = ("np", "torch", "math", "leep", "dataset_transferability_map", "B", "TB", "TOY_THETA", "TOY_Y", "TOY_PROBS",
                      "TOY_LABELS", "TOY_T", "TOY_CE", "TOY_LAB", "TOY_R", "FEW_VANILLA", "FEW_TRM", "TOY_CURVE", "TOY_DIFFS")


def solution_namespace() -> dict:
    """The names a solution's code runs with (``exec(solution_text, solution_namespace())``)."""
    ns = {"np": np, "torch": torch, "math": math, "leep": leep, "dataset_transferability_map": dataset_transferability_map,
          "B": B, "TB": TB}
    ns.update({k: globals()[k] for k in SOLUTION_NAMESPACE if k in globals()})
    return ns


ALL = {"01_leep": nb01, "02_pixel_leep": nb02, "03_risk_maps": nb03, "04_weighted_finetuning": nb04,
       "05_few_shot": nb05, "06_transfer_cell": nb06, "07_reproduce_paper": nb07}
