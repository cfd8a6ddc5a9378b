"""Enumerable problems with a known expert reward, where the exact distance from a trained policy to
the predicted optimum is computed: `tabular` (a categorical policy per context; `optima` holds the
data distributions, the exact objective and its solver; `plots` the pictures)."""
