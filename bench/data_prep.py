"""Data preparation at scale, softpo against TRL: `python -m bench.data_prep --rows N --out DIR`.

On one preference file per form (`plain`: string rows; `chat`: conversations; written by
`bench.big_prefs`), each measured in a fresh process:

* `softpo-cold`  a run's start-up data path, `softpo.build.load_data` (read, validate, tokenise,
                 split, the regulariser's prompts) with an empty token cache (it writes the entry);
* `softpo-warm`  the same again: the cache entry written by `softpo-cold` is read instead;
* `data-check`   the whole command `softpo data check FILE --tokenizer T --no-cache` (tokenizer
                 loading included);
* `trl-cold`     TRL's `DPOTrainer` dataset preparation: `datasets.load_dataset("json")` and
                 `DPOTrainer._prepare_dataset` (prompt extraction, EOS, tokenising prompt,
                 prompt + chosen and prompt + rejected, dropping prompts of `max_length` tokens or
                 more) with `dataset_num_proc` processes and an empty datasets cache;
* `trl-warm`     the same again on the datasets cache `trl-cold` filled (`map` finds its results).

The same tokenizer and `max_length` on both sides (TRL 1.x truncates later, in its collator; softpo
cuts here, keeping the last `max_prompt_length` prompt tokens). softpo encodes in Rust threads on
every core, TRL runs `--num-proc` processes (default: every core). Timed: the data path only, after
the imports and the tokenizer are loaded (`data-check` times the whole command). Memory: the peak
over the run of the proportional set size (PSS) summed over the process and its children, sampled
every 50 ms from /proc (so TRL's worker processes count, and pages they share count once), and the
process's own peak RSS. Rounds alternate the order of softpo and TRL. Results: `DIR/runs.jsonl`, one
line per run, and `DIR/summary.md` with medians and the ratios softpo / TRL (goal: at least 3x TRL's
rows/s at no more memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ["softpo-cold", "trl-cold", "softpo-warm", "trl-warm", "data-check"]
PAIRS = [("softpo-cold", "trl-cold"), ("softpo-warm", "trl-warm"), ("softpo-warm", "trl-cold")]
GOAL = (3.0, 1.0)  # softpo / TRL: rows/s at least, peak memory at most


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.data_prep", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows per file (bench.big_prefs)")
    p.add_argument("--out", type=Path, required=True, help="results folder (data files go in data/)")
    p.add_argument("--forms", default="plain,chat", help="comma-separated: plain, chat")
    p.add_argument("--tokenizer", default="default", help="`default` (softpo's SmolLM2), `tiny` "
                   "(the byte tokenizer) or a tokenizer folder")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1,
                   help="TRL's dataset_num_proc (softpo uses every core through Rust threads)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (alternating order)")
    p.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated, from: "
                   f"{', '.join(MEASURES)} (a -warm measure needs its -cold one)")
    p.add_argument("--seed", type=int, default=0, help="the data's seed")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    p.add_argument("--summarize", action="store_true", help="only rebuild DIR/summary.md")
    return p.parse_args(argv)


# ---------------------------------------------------------------- inputs

def data_file(out: Path, form: str, rows: int, seed: int) -> Path:
    """The form's JSONL under `out/data/`, written once."""
    from bench import big_prefs

    path = out / "data" / f"{form}-{rows}-seed{seed}.jsonl"
    if not path.is_file():
        big_prefs.write(path, rows, seed, chat=form == "chat")
    return path


def tokenizer_dir(out: Path, name: str) -> Path:
    """A folder both frameworks load the tokenizer from."""
    if name == "default":
        from softpo.models import fetch_default

        return fetch_default(progress=False)
    if name == "tiny":
        from softpo.models import byte_tokenizer

        folder = out / "tokenizer-tiny"
        if not (folder / "tokenizer.json").is_file():
            byte_tokenizer().save_pretrained(folder)
        return folder
    return Path(name)


# ---------------------------------------------------------------- one measured run (the worker)

def _self_peaks() -> dict:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_softpo(args) -> dict:
    """softpo's start-up data path (`load_data`), through the token cache in `args.cache`."""
    from softpo import tokcache
    from softpo.build import load_data
    from softpo.config import load_config
    from softpo.losses import get_loss
    from softpo.models import load_tokenizer

    cfg = load_config(None, [f"data.train={args.data}", "data.eval_fraction=0",
                             f"data.max_length={args.max_length}",
                             f"data.max_prompt_length={args.max_prompt_length}",
                             "data.on_bad_rows=skip", f"model.name_or_path={args.tokenizer}",
                             "loss.name=spo"])
    tokenizer = load_tokenizer(cfg.model)
    tokcache.default_dir = lambda: Path(args.cache)
    start = time.perf_counter()
    data = load_data(cfg, tokenizer, get_loss(cfg.loss.name))
    seconds = time.perf_counter() - start
    report = data.reports[0]
    return {"seconds": seconds, "rows": report.rows_read, "kept": len(data.train_set),
            "tokens": sum(report.prompt_tokens) + sum(report.response_tokens)}


def run_check(args) -> dict:
    """The whole `softpo data check` command, uncached."""
    import contextlib
    import io

    from softpo import cli

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli.main(["data", "check", args.data, "--tokenizer", args.tokenizer, "--no-cache",
                         "--skip-bad-rows", "--max-length", str(args.max_length),
                         "--max-prompt-length", str(args.max_prompt_length)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"softpo data check exited with {code}")
    first = out.getvalue().splitlines()[0]  # "<file>: pairs, N rows read, ..."
    return {"seconds": seconds, "rows": int(first.split(" rows read")[0].rsplit(" ", 1)[1]),
            "report": out.getvalue()}


def run_trl(args) -> dict:
    """TRL's DPOTrainer dataset preparation, datasets cache in `args.cache`."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = DPOConfig(output_dir=str(Path(args.cache) / "out"), max_length=args.max_length,
                       dataset_num_proc=args.num_proc, report_to=[], use_cpu=True)
    trainer = object.__new__(DPOTrainer)  # only what _prepare_dataset reads: no model is loaded
    trainer._tokenizer = tokenizer
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=args.data, split="train", cache_dir=args.cache)
    prepared = DPOTrainer._prepare_dataset(trainer, ds, tokenizer, config, "train")
    seconds = time.perf_counter() - start
    lengths = [sum(map(len, prepared[c])) for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return {"seconds": seconds, "rows": len(ds), "kept": len(prepared), "tokens": sum(lengths)}


def worker(argv: list[str]) -> int:
    """`python -m bench.data_prep worker WHAT ...`: one measured run, its JSON on --result."""
    p = argparse.ArgumentParser(prog="python -m bench.data_prep worker")
    p.add_argument("what", choices=["softpo", "check", "trl"])
    for flag in ("--data", "--tokenizer", "--cache", "--result"):
        p.add_argument(flag, required=True)
    for flag in ("--max-length", "--max-prompt-length", "--num-proc"):
        p.add_argument(flag, type=int, required=True)
    args = p.parse_args(argv)
    run = {"softpo": run_softpo, "check": run_check, "trl": run_trl}[args.what]
    result = {**run(args), **_self_peaks(), "load_average": os.getloadavg()[0]}
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- the parent: memory and order

def _pss_kb(pid: int) -> int:
    """A process's PSS in kB (/proc/PID/smaps_rollup), else its RSS; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss // 1024
    except Exception:  # psutil missing, or the process is gone
        return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process and its descendants every `every` s; `peak_mb`."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kb, self.done = pid, every, 0, threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.is_set():
            try:
                pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                break
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
            self.done.wait(self.every)

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def measure(what: str, data: Path, tokenizer: Path, cache: Path, args, result: Path) -> dict:
    """One worker in a fresh process, its tree's memory sampled; its JSON or the error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false" if what == "trl" else "true"}
    cmd = [sys.executable, "-m", "bench.data_prep", "worker", what, "--data", str(data),
           "--tokenizer", str(tokenizer), "--cache", str(cache), "--result", str(result),
           "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
           "--num-proc", str(args.num_proc)]
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    try:
        _, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {args.timeout}s"}
    finally:
        sampler.done.set()
        sampler.join()
    if proc.returncode != 0 or not result.is_file():
        return {"error": err[-3000:]}
    return {**json.loads(result.read_text()), "peak_tree_pss_mb": sampler.peak_mb,
            "process_seconds": time.perf_counter() - start}


def plan(round_: int, only: list[str]) -> list[str]:
    """The measures of one round: softpo and TRL alternate, swapped every other round; each warm
    run after its cold one."""
    order = list(MEASURES)
    if round_ % 2:
        order = ["trl-cold", "softpo-cold", "trl-warm", "softpo-warm", "data-check"]
    return [m for m in order if m in only]


def run_round(form: str, r: int, data: Path, tokenizer: Path, args, log: Path) -> None:
    caches = {side: args.out / "cache" / f"{side}-{form}-{r}" for side in ("softpo", "trl")}
    for folder in caches.values():
        shutil.rmtree(folder, ignore_errors=True)
    for name in plan(r, args.only.split(",")):
        side = name.split("-")[0]
        what = {"softpo-cold": "softpo", "softpo-warm": "softpo", "data-check": "check"}.get(name, "trl")
        res = measure(what, data, tokenizer, caches.get(side, args.out / "cache" / "check"), args,
                      args.out / "result.json")
        entry = {"form": form, "measure": name, "round": r, "rows_in_file": args.rows, **res}
        with log.open("a") as f:
            f.write(json.dumps({k: v for k, v in entry.items() if k != "report"}) + "\n")
        say = res["error"].strip().splitlines()[-1:] if "error" in res else \
            f"{res['rows'] / res['seconds']:.0f} rows/s, {res['peak_tree_pss_mb']:.0f} MB"
        print(f"[data_prep] {form} {name} round {r}: {say}", flush=True)
    for folder in caches.values():
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- summary

def table(log: Path) -> dict:
    """{(form, measure): medians of seconds, rows/s, memory over its runs}."""
    runs: dict[tuple, list] = {}
    for line in log.read_text().splitlines():
        e = json.loads(line)
        if "error" not in e:
            runs.setdefault((e["form"], e["measure"]), []).append(e)
    med = statistics.median
    return {k: {"rows": rs[0]["rows"], "seconds": med(r["seconds"] for r in rs),
                "rows_s": med(r["rows"] / r["seconds"] for r in rs),
                "pss_mb": med(r["peak_tree_pss_mb"] for r in rs),
                "rss_mb": med(r["peak_rss_mb"] for r in rs), "runs": len(rs),
                "load": med(r["load_average"] for r in rs)} for k, rs in runs.items()}


def write_summary(out: Path) -> str:
    """`out/summary.md` from `out/runs.jsonl`; returns its text."""
    t = table(out / "runs.jsonl")
    lines = ["Peak memory: PSS of the process and its children (sampled every 50 ms), and the "
             "process's own peak RSS. Medians over the runs.", ""]
    for form in sorted({f for f, _ in t}):
        lines += [f"### {form}", "", "| measure | rows | seconds | rows/s | peak PSS MB (tree) | "
                  "peak RSS MB (process) | load avg | runs |", "|---|---|---|---|---|---|---|---|"]
        for m in MEASURES:
            if (form, m) in t:
                x = t[(form, m)]
                lines.append(f"| {m} | {x['rows']} | {x['seconds']:.1f} | {x['rows_s']:.0f} | "
                             f"{x['pss_mb']:.0f} | {x['rss_mb']:.0f} | {x['load']:.1f} | {x['runs']} |")
        lines += ["", "| softpo / TRL | rows/s | peak memory (PSS) | goal |", "|---|---|---|---|"]
        for ours, theirs in PAIRS:
            if (form, ours) in t and (form, theirs) in t:
                a, b = t[(form, ours)], t[(form, theirs)]
                speed, mem = a["rows_s"] / b["rows_s"], a["pss_mb"] / b["pss_mb"]
                met = "met" if speed >= GOAL[0] and mem <= GOAL[1] else "NOT met"
                lines.append(f"| {ours} / {theirs} | {speed:.2f}x | {mem:.2f}x | >= {GOAL[0]:g}x "
                             f"rows/s at <= {GOAL[1]:g}x memory: {met} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    args = arguments(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        print(write_summary(args.out))
        return 0
    unknown = set(args.only.split(",")) - set(MEASURES)
    if unknown or not set(args.forms.split(",")) <= {"plain", "chat"}:
        raise SystemExit(f"unknown measure or form: {', '.join(sorted(unknown)) or args.forms}")
    log = args.out / "runs.jsonl"
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}))
    tokenizer = tokenizer_dir(args.out, args.tokenizer)
    for form in args.forms.split(","):
        data = data_file(args.out, form, args.rows, args.seed)
        with open(data, "rb") as f:  # into the page cache before the first timed run
            while f.read(1 << 24):
                pass
        for r in range(args.repeats):
            run_round(form, r, data, tokenizer, args, log)
    print(write_summary(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
