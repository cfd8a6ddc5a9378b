"""Cached reference log-probs: computed once over the data, persisted, keyed by data and model.

Reference-based losses (dpo, ipo, rdpo, ...) need `logp_ref(y|x)` for every response of every batch.
The reference is frozen, so these numbers never change during a run: with
`loss.precompute_ref_logps: true` softpo computes them once before the first step (train and eval
rows), stores them, and the training step runs no reference forward at all. When the regulariser does
not need the reference either, the separate reference model is then freed (one model copy less).

What a cached value is keyed by
-------------------------------
* each row by its exact token ids and its prompt length (`row_keys`): a 16-byte BLAKE2b digest of
  `[prompt, response]`, so the lookup is by content, whatever the batch, order or process;
* the file by a digest of (format version, reference weights fingerprint, dtype and autocast setting,
  the sorted digests of all rows). The token ids already encode the data file's content, the
  tokenizer, the chat template and the truncation lengths, so a change to any of those (or to the
  reference weights or precision) gives another file; an unchanged setup reuses the file across runs
  (e.g. a sweep over beta computes the reference once).

Files: `<dir>/<key>.safetensors` with `keys` (N, 16) uint8 and `logps` (N,) float32, metadata naming
the parts of the key; written atomically by the main process. Values are those of the reference
forward the trainer would run (same code path and precision), equal to the per-step values up to
float round-off of different padding widths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from softpo.collate import PreferenceBatch
from softpo.config import Config
from softpo.logprobs import Reference
from softpo.models import cache_root
from softpo.packing import Rows

FORMAT = 1
DIGEST = 16  # bytes per row key


def row_keys(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> list[bytes | None]:
    """One digest per right-padded row `[prompt, response, pad]`; None for rows without a response."""
    ids, lengths, resp = input_ids.cpu(), attention_mask.sum(1).tolist(), response_mask.cpu()
    keys: list[bytes | None] = []
    for r, length in enumerate(lengths):
        first = resp[r].nonzero()
        if len(first) == 0:
            keys.append(None)
            continue
        h = hashlib.blake2b(digest_size=DIGEST)
        h.update(int(first[0]).to_bytes(8, "little"))
        h.update(ids[r, :length].to(torch.int64).numpy().tobytes())
        keys.append(h.digest())
    return keys


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Digest of every tensor in the state dict (names, shapes, dtypes, bytes), LoRA weights excluded:
    the reference of a LoRA run is the model with its adapter disabled."""
    h = hashlib.blake2b(digest_size=DIGEST)
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RefLogpCache:
    """Row digest -> reference log-prob (summed over the response tokens)."""

    def __init__(self, table: dict[bytes, float], path: Path | None = None):
        self.table, self.path = table, path

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
        """(R,) float32 on the rows' device; 0 for rows without a response (padding responses)."""
        values = []
        for r, key in enumerate(row_keys(input_ids, attention_mask, response_mask)):
            if key is None:
                values.append(0.0)
            elif key in self.table:
                values.append(self.table[key])
            else:
                raise KeyError(f"row {r} of this batch is not in the reference log-prob cache "
                               f"{self.path} (were the rows changed after it was built?)")
        return torch.tensor(values, dtype=torch.float32, device=input_ids.device)

    def save(self, path: Path, meta: dict) -> None:
        """Write the table atomically to `path` with `meta`."""
        from safetensors.torch import save_file

        keys = sorted(self.table)
        tensors = {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(-1, DIGEST),
                   "logps": torch.tensor([self.table[k] for k in keys], dtype=torch.float32)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path: Path) -> "RefLogpCache":
        """The table saved at `path`."""
        from safetensors.torch import load_file

        t = load_file(str(path))
        keys = [bytes(row) for row in t["keys"].tolist()]
        return cls(dict(zip(keys, t["logps"].tolist())), path)


def cache_key(weights: str, precision: str, keys: list[bytes]) -> str:
    """The cache file's name: a digest of the format, the weights, the precision and the rows."""
    h = hashlib.blake2b(digest_size=DIGEST)
    h.update(json.dumps({"format": FORMAT, "weights": weights, "precision": precision}).encode())
    for k in sorted(keys):
        h.update(k)
    return h.hexdigest()


def compute(reference: Reference, batches: list[PreferenceBatch], rows_of) -> dict[bytes, float]:
    """Reference log-probs of every row of every batch (`rows_of(batch)` -> softpo Rows)."""
    table: dict[bytes, float] = {}
    for batch in batches:
        rows = rows_of(batch)
        values = reference.sequence_logps(rows).float().cpu().tolist()  # (R,)
        for key, value in zip(row_keys(rows.input_ids, rows.attention_mask, rows.response_mask),
                              values):
            if key is not None:
                table[key] = value
    return table


def default_dir() -> Path:
    """`$SOFTPO_CACHE/ref_logps` (default ~/.cache/softpo/ref_logps)."""
    return cache_root() / "ref_logps"


def load_or_build(reference: Reference, batches: list[PreferenceBatch], cfg: Config,
                  accelerator) -> RefLogpCache:
    """The cache for `reference` and the rows of `batches` (every train and eval row of a run):
    loaded if its file exists, else computed (each process its share of the batches, gathered)
    and written by the main process. `cfg` names the folder, the precision and the metadata."""
    from accelerate.utils import gather_object

    acc = accelerator
    all_keys = [k for b in batches for k in row_keys(b.input_ids, b.attention_mask, b.response_mask)
                if k is not None]
    precision = f"{cfg.model.dtype}{'+autocast_bf16' if cfg.model.autocast_bf16 else ''}"
    weights = weights_fingerprint(reference.model)
    key = cache_key(weights, precision, all_keys)
    path = Path(cfg.loss.ref_cache_dir or default_dir()) / f"{key}.safetensors"
    if path.is_file():
        cache = RefLogpCache.load(path)
        acc.print(f"softpo: reference log-probs of {len(cache)} rows read from {path}")
        return cache
    start = time.perf_counter()
    W, r = acc.num_processes, acc.process_index
    mine = compute(reference, batches[r::W], lambda b: Rows(b.input_ids, b.attention_mask,
                                                            b.response_mask))
    table = dict(kv for part in (gather_object([mine]) if W > 1 else [mine]) for kv in part.items())
    cache = RefLogpCache(table, path)
    if acc.is_main_process:
        cache.save(path, {"format": FORMAT, "weights": weights, "precision": precision,
                          "rows": len(table), "model": cfg.model.name_or_path,
                          "ref_model": cfg.model.ref_name_or_path, "train": cfg.data.train,
                          "eval": cfg.data.eval, "max_length": cfg.data.max_length,
                          "max_prompt_length": cfg.data.max_prompt_length})
    acc.wait_for_everyone()
    acc.print(f"softpo: reference log-probs of {len(table)} rows computed in "
              f"{time.perf_counter() - start:.1f}s and cached in {path}")
    return cache
