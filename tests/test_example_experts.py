"""The shipped example experts (examples/experts/), by hand-worked values."""

import pytest

from examples.experts import concise, plain
from softpo.tasks.experts import load_callable


@pytest.mark.parametrize("response, want", [
    ("", 0.0), ("one two three", 1.0), (" ".join(["w"] * 10), 1.0),
    (" ".join(["w"] * 25), 0.5),   # (40 - 25) / (40 - 10)
    (" ".join(["w"] * 40), 0.0), (" ".join(["w"] * 90), 0.0)])
def test_concise(response, want):
    assert concise.reward("q", response) == pytest.approx(want)


@pytest.mark.parametrize("response, want", [
    ("", 0.0), ("42 !", 0.0),                      # no alphabetic word
    ("the cat sat", 1.0),                          # 3 of 3 short: (1 - 0.5) / 0.5
    ("photosynthesis converts light", 0.0),        # 1 of 3 short (light): below the floor
    ("plants convert light into sugar", 0.2),      # 3 of 5 short: (0.6 - 0.5) / 0.5
    ("Plants convert light into sugar. " * 7, 0.2)])  # a share: repeating changes nothing
def test_plain(response, want):
    assert plain.reward("q", response) == pytest.approx(want)


def test_examples_load_as_experts_by_name():
    for spec in ("examples.experts.concise:reward", "examples.experts.plain:reward"):
        assert 0.0 <= load_callable(spec)("q", "a short answer") <= 1.0
