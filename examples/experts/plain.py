"""An expert that prefers plain words: `softpo build-prefs ... --expert examples.experts.plain:reward`.

reward = the share of the answer's words that are short (at most SHORT letters), mapped linearly from
[FLOOR, 1] onto [0, 1]; an empty answer gets 0. The reward is a share, not a count, so it does not depend on the answer's length: unlike
`examples.experts.concise`, the answers it prefers are not the more likely ones a priori just by
being shorter, which is the other case SPO meets with a user's expert (docs/experts.md).
"""

import re

SHORT = 5  # letters
FLOOR = 0.5  # the share of short words below which the reward is 0

_WORD = re.compile(r"[A-Za-z]+")


def short_share(text: str) -> float | None:
    """The share of alphabetic words of at most SHORT letters; None when there is no word."""
    found = _WORD.findall(text)
    if not found:
        return None
    return sum(len(w) <= SHORT for w in found) / len(found)


def reward(prompt, response: str) -> float:
    """(share of short words - FLOOR) / (1 - FLOOR), clipped to [0, 1]; 0.0 without words."""
    share = short_share(response)
    if share is None:
        return 0.0
    return max(0.0, min(1.0, (share - FLOOR) / (1.0 - FLOOR)))
