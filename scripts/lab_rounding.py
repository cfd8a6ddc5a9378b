"""The sequence lab's seeds report with length groups off: runs that differ from the published ones
only in float rounding (one padded block per forward instead of up to four length groups; the
same computation, summed in another order). How far the exact KLs move says how closely a run on
another processor, whose kernels round differently, should match (docs/lab.md).

    python scripts/lab_rounding.py > rounding.json     # 15 runs, about 2 minutes each
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from softpo import logprobs
    from softpo.lab import seqreport
    from softpo.lab.sequence import SeqConfig, resolve

    grouped = logprobs.length_groups
    logprobs.length_groups = lambda lengths, max_groups=1, *a, **k: grouped(lengths, 1, *a, **k)
    rows = seqreport.seeds(resolve(SeqConfig()), None, echo=False)
    print(json.dumps({"runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
