"""An expert that prefers concise answers: `softpo build-prefs ... --expert examples.experts.concise:reward`.

reward = 1 for an answer of at most SHORT words, falling linearly to 0 at LONG words and staying 0
beyond; an empty answer gets 0. The answers this expert prefers are usually already the more
likely ones under a language model (a shorter sequence has fewer tokens whose log-probabilities add
up), which is the case where SPO's pairwise term can start saturated (docs/experts.md).
"""

SHORT, LONG = 10, 40


def words(text: str) -> int:
    return len(text.split())


def reward(prompt, response: str) -> float:
    """1.0 for <= SHORT words, linear down to 0.0 at LONG words; 0.0 for an empty answer."""
    n = words(response)
    if n == 0:
        return 0.0
    return max(0.0, min(1.0, (LONG - n) / (LONG - SHORT)))
