"""Test settings shared by the suite: offline hub, deterministic seeds, two CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Each test's tokenised sets are kept in a folder of its own, not in the user's cache."""
    from softpo import tokcache

    folder = tmp_path_factory.mktemp("tokens")
    monkeypatch.setattr(tokcache, "default_dir", lambda: folder)
    yield folder


@pytest.fixture
def full_logits_calls(monkeypatch) -> list:
    """Counts the calls of `logprobs.full_logits_label_logps` (the whole-logits path), which
    still computes as before: a test asserts the path it means to exercise was taken."""
    from softpo import logprobs

    calls: list = []
    full = logprobs.full_logits_label_logps
    monkeypatch.setattr(logprobs, "full_logits_label_logps",
                        lambda *a, **k: calls.append(1) or full(*a, **k))
    return calls
