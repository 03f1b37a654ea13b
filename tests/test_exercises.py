"""The notebooks' checked exercises: each reference solution passes its check, plausible wrong
answers fail with a message that says what is wrong, an unanswered one is 'not attempted'."""
import math

import numpy as np
import pytest
import torch

from trm_utils.exercises import (ALL, CORRECT, INCORRECT, NOT_ATTEMPTED, TOY_CE, TOY_R, compare_array,
                                 solution_namespace)

EXERCISES = [q for ns in ALL.values() for q in vars(ns).values()]

#: per exercise, plausible wrong answers and a fragment of the message each must get
WRONG = {
    "nb01.q1": [([[0.6, 0.4], [0.1, 0.9]], "elements differ"), ([0.6, 0.4], "shape (2,), expected (2, 2)")],
    "nb01.q2": [(0.475, "off by"), ("low", "expected a number")],
    "nb02.q1": [(-0.5632, "off by")],
    "nb02.q2": [([[-0.5632, 0.0]], "greatest difference"), ([0.0, -0.5632], "shape")],
    "nb03.q1": [([[1.0, 0.625], [0.0, 0.75]], "elements differ"), (torch.zeros(2, 2), "elements differ")],
    "nb03.q2": [(0.375, "off by"), (10 ** 0.625, "off by")],
    # the mean over all four pixels (vanilla's normaliser) instead of the foreground count
    "nb04.q1": [(sum(r * c for r, c in zip(TOY_R, TOY_CE)) / 4, "off by"), (float("nan"), "finite")],
    "nb04.q2": [(math.exp(-0.3), "off by"), (1.3, "off by")],
    "nb05.q1": [(2.28, "off by"), (0.0228, "off by")],
    "nb05.q2": [(float(np.std([0.73, 0.74, 0.72])), "off by")],  # ddof=0
    "nb06.q1": [(4, "is not right"), (20.0, "whole number")],
    "nb06.q2": [("flat", "is not right"), (True, "a string")],
    "nb07.q1": [((3, 2, 3), "entries [1, 2]"), ((3, 3), "tuple of 3")],
    "nb07.q2": [(4.37, "off by"), (0.018, "off by")],
}


def test_every_notebook_has_at_least_two_checked_exercises():
    assert list(ALL) == ["01_leep", "02_pixel_leep", "03_risk_maps", "04_weighted_finetuning", "05_few_shot",
                         "06_transfer_cell", "07_reproduce_paper"]
    for ns in ALL.values():
        assert len(vars(ns)) >= 2
    assert set(WRONG) == {q.name for q in EXERCISES}


@pytest.mark.parametrize("q", EXERCISES, ids=lambda q: q.name)
def test_reference_solution_passes(q, capsys):
    ns = solution_namespace()
    exec(q.solution_text, ns)
    assert q.check(ns["answer"]) == CORRECT
    assert f"{q.name}: correct." in capsys.readouterr().out


@pytest.mark.parametrize("q", EXERCISES, ids=lambda q: q.name)
def test_wrong_answers_fail_with_what_is_wrong(q):
    for answer, fragment in WRONG[q.name]:
        status, message = q.evaluate(answer)
        assert status == INCORRECT, (q.name, answer)
        assert fragment in message and "hint()" in message, message


@pytest.mark.parametrize("q", EXERCISES, ids=lambda q: q.name)
def test_unanswered_is_not_attempted_and_never_raises(q, capsys):
    assert q.check(None) == NOT_ATTEMPTED and q.check(...) == NOT_ATTEMPTED
    assert "not attempted" in capsys.readouterr().out
    q.hint()
    q.solution()
    out = capsys.readouterr().out
    assert "hint" in out and "solution" in out
    assert q.evaluate(object())[0] == INCORRECT  # an answer of a kind nothing can read is wrong, not a crash


def test_array_comparison_names_the_worst_element():
    msg = compare_array([[0.0, 1.0], [2.0, 3.5]], [[0.0, 1.0], [2.0, 3.0]])
    assert "1 of 4 elements differ" in msg and "index (1, 1)" in msg and "3.5" in msg
    assert compare_array(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])) is None
