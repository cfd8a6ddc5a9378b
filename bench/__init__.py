"""softpo vs TRL, side by side: `python -m bench --help`.

Modules: `cases` (what is compared), `assets` (models, tokenizers and data built once and cached),
`worker` (one timed run in a fresh process), `flops` (model FLOPs and the measured matmul peak),
`runner` (alternation, medians, ratios, the report). See docs/benchmarks.md.

`python -m bench.data_prep` compares data preparation at scale (start-up, `softpo data check`, the
token cache) with TRL's on files written by `bench.big_prefs`; see docs/data-at-scale.md.
"""
