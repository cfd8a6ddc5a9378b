"""`softpo export`: a trained model as a plain Hugging Face folder that loads with
`AutoModelForCausalLM.from_pretrained(folder)` alone.

The source is a run directory (its `final/`) or a model folder:

* a full model is copied (safetensors weights, config, tokenizer);
* a LoRA adapter with `merge=True` is loaded on its base and merged into the weights
  (W + (lora_alpha / r) B A for every adapted layer): an ordinary model, no PEFT needed to load it;
* a LoRA adapter without `merge` is copied as an adapter whose `base_model_name_or_path` names its
  base (transformers loads the base, then the adapter; PEFT must be installed). A base that cannot
  be loaded by name (softpo's `tiny`, kept in the run's `final/base/`) is copied into the export's
  `base/` and named by its absolute path: moving the folder means editing that path, or merging.

Each export carries the tokenizer, the run's `config.yaml` and a model card (README.md) with the
method, the data and the run's final metrics (`softpo.report.model_card`). The folder is assembled
in a temporary sibling and renamed into place, so a failed export leaves nothing behind; an existing
folder is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from softpo.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CARD, RUN_CONFIG = "README.md", "config.yaml"


@dataclass
class Source:
    """What is exported: the model folder, the run it came from (if any), and its kind."""

    folder: Path  # the model folder (a run's final/)
    run_dir: Path | None  # the run directory holding metrics.jsonl, when known
    kind: str  # "model" or "adapter"


def find_source(name: str) -> Source:
    """A run directory (its `final/`) or a model folder; anything else is a one-line UserError."""
    from softpo.models import model_folder_kind

    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError("not found" if not path.exists() else "expected a run directory or a "
                        "model folder, got a file", source=name)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        if (path / "final").is_dir():
            path = path / "final"
        elif (path / RUN_CONFIG).is_file():
            raise UserError("this run has no final/ model (did it finish?)", source=name)
    try:
        kind = model_folder_kind(str(path))
    except UserError:
        raise UserError("not a model folder or a run directory (no config.json, "
                        "adapter_config.json or final/)", source=name) from None
    if not any(path.glob("*.safetensors")):
        raise UserError(f"no *.safetensors weights in {path} (softpo exports safetensors only)",
                        source=name)
    run_dir = path.parent if (path.parent / "metrics.jsonl").is_file() else None
    return Source(path, run_dir, kind)


def final_metrics(run_dir: Path | None) -> dict[str, float]:
    """The last logged value of every finite metric of a run's metrics.jsonl (empty without)."""
    from softpo.tracking import read_metrics

    out: dict[str, float] = {}
    if run_dir is None:
        return out
    for row in read_metrics(run_dir / "metrics.jsonl"):
        out.update({k: float(v) for k, v in row.items() if k not in ("step", "time")
                    and isinstance(v, (int, float)) and math.isfinite(v)})
    return out


def export_card(source: Source, origin: str, merge: bool, base: str | None) -> str:
    """The model card: the run's (method, data, final metrics) when its config.yaml reads, and how
    this folder was exported."""
    from softpo.config import load_config
    from softpo.report import model_card

    config = source.folder / RUN_CONFIG
    card = "# Model exported with softpo\n"
    if config.is_file():
        try:
            card = model_card(load_config(config), final_metrics(source.run_dir),
                              merged=merge and source.kind == "adapter")
        except UserError as e:
            card += f"\nThe run's config.yaml could not be read: {e}\n"
    if source.kind == "model":
        how = "the full model, copied"
    elif merge:
        how = "the LoRA adapter merged into the base weights: a plain model"
    else:
        how = f"the LoRA adapter; its base is `{base}` (loaded first by transformers, with PEFT)"
    return card.rstrip("\n") + "\n\n## Export\n\n" + \
        f"Exported by `softpo export` from `{origin}`: {how}. Load it with " \
        "`AutoModelForCausalLM.from_pretrained(folder)` and " \
        "`AutoTokenizer.from_pretrained(folder)`.\n"


def export(name: str, out: str | Path, merge: bool = False) -> Path:
    """Export the run or model folder `name` to the new folder `out` (module docstring)."""
    out = Path(out).expanduser()
    if out.exists():
        raise UserError("already exists; export writes a new folder", source=str(out))
    source = find_source(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        if source.kind == "model":
            base = None
            _copy_files(source.folder, tmp)
        elif merge:
            base = None
            _write_merged(source, tmp)
        else:
            base = _copy_adapter(source.folder, tmp, out.resolve())
        (tmp / CARD).write_text(export_card(source, name, merge, base), encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_files(folder: Path, dest: Path) -> None:
    """The folder's files (not its subfolders, not pickles) into `dest`."""
    for f in folder.iterdir():
        if f.is_file() and not f.name.endswith(PICKLE_SUFFIXES) and f.name != CARD:
            shutil.copy2(f, dest / f.name)


def _write_merged(source: Source, dest: Path) -> None:
    """Load the adapter on its base (as softpo does), merge, save the plain model and tokenizer."""
    from softpo.config import ModelConfig, load_config
    from softpo.models import load_model, load_tokenizer

    dtype = "float32"
    if (source.folder / RUN_CONFIG).is_file():
        try:
            dtype = load_config(source.folder / RUN_CONFIG).model.dtype
        except UserError:
            pass
    cfg = ModelConfig(name_or_path=str(source.folder), dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed=0).merge_and_unload()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if (source.folder / RUN_CONFIG).is_file():
        shutil.copy2(source.folder / RUN_CONFIG, dest / RUN_CONFIG)


def _copy_adapter(folder: Path, dest: Path, final: Path) -> str:
    """The adapter's files, and its base: named as it was, or (a base kept in `base/`) copied to
    `dest/base` and named by its path once the export is in place at `final`. Returns the name."""
    _copy_files(folder, dest)
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base = config.get("base_model_name_or_path")
    if (folder / "base").is_dir():
        shutil.copytree(folder / "base", dest / "base")
        base = str(final / "base")
    if not base:
        raise UserError("the adapter names no base model (base_model_name_or_path) and has no "
                        "base/ folder", source=str(folder))
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return base
