"""Labs: enumerable problems with a known expert reward, where the exact distance from a trained
policy to the predicted optimum is computed. `tabular` trains a categorical policy per context
(`optima` holds its data distributions, exact objective and solver; `plots` its pictures)."""

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """Tiny tensors: one thread is fastest, and spares the other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
