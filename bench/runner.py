"""`python -m bench`: softpo and TRL timed side by side, alternating, each run in a fresh process.

For each case, `--repeats` rounds; a round runs every variant once, softpo and TRL variants
interleaved (softpo, TRL, softpo, TRL, ...), the order reversed every other round so that slow drifts
of the machine fall on both sides. The matmul peak is measured before and after, in its own process.
Everything is appended to `<out>/runs.jsonl` as it happens; `<out>/summary.md` holds the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import (CASES, DEFAULT_VARIANTS, DEFAULT_WORKLOAD, MFU_TARGET, RATIOS, VARIANTS,
                         Workload, steps_for)

ROOT = Path(__file__).resolve().parent.parent


def arguments(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="tiny,gpt2-86m,smollm2,smollm2-lora",
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: bf16 autocast, fp32 master weights (both frameworks); fp32: none")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both frameworks train; on cuda, memory is torch's peak allocation")
    p.add_argument("--pairs", type=int, default=DEFAULT_WORKLOAD.pairs,
                   help="preference pairs per optimiser step (the batch)")
    p.add_argument("--max-length", type=int, default=DEFAULT_WORKLOAD.max_length,
                   help="longest prompt + response in tokens: prompts of a quarter to a half of it, "
                        "responses likewise, never truncated")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant (alternating)")
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per run before it is killed")
    p.add_argument("--omp-wait-policy", choices=["passive", "active"],
                   help="OMP_WAIT_POLICY for every run (default: inherited). `passive` stops idle "
                        "OpenMP threads from spinning, which matters on a machine shared with "
                        "other processes (see docs/benchmarks.md)")
    p.add_argument("--quick", action="store_true",
                   help="iteration mode: --cases tiny --repeats 1 --steps 2 unless given")
    p.add_argument("--out", type=Path, help="results folder (default runs/bench/<time>)")
    p.add_argument("--summarize", type=Path, help="only rebuild the summary of a results folder")
    args = p.parse_args(argv)
    try:
        Workload(args.pairs, args.max_length)
    except ValueError as e:
        p.error(str(e))
    if args.quick:
        given = set(argv or sys.argv[1:])
        args.cases = args.cases if "--cases" in given else "tiny"
        args.repeats = args.repeats if "--repeats" in given else 1
        args.steps = args.steps if "--steps" in given else 2
    return args


def worker(args: list[str], out: Path, timeout: int, env_extra: dict | None = None) -> dict:
    """`python -m bench.worker ...` in a fresh process; its JSON, or the error it died with."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [sys.executable, "-m", "bench.worker", *args, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if proc.returncode != 0 or not out.is_file():
        return {"error": proc.stderr[-3000:]}
    return json.loads(out.read_text())


def interleaved(variants: list[str], round_: int) -> list[str]:
    """softpo and TRL variants alternately; reversed on odd rounds."""
    ours = [v for v in variants if VARIANTS[v].framework == "softpo"]
    theirs = [v for v in variants if VARIANTS[v].framework == "trl"]
    order = []
    for i in range(max(len(ours), len(theirs))):
        order += ours[i:i + 1] + theirs[i:i + 1]
    return order[::-1] if round_ % 2 else order


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.summarize:
        print(write_summary(args.summarize))
        return 0
    cases, variants = args.cases.split(","), args.variants.split(",")
    for name in cases + variants:
        if name not in CASES and name not in VARIANTS:
            raise SystemExit(f"unknown case or variant '{name}'")
    out = args.out or ROOT / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}))
    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--device", args.device]
    shape = ["--pairs", str(args.pairs), "--max-length", str(args.max_length)]
    env = {"OMP_WAIT_POLICY": args.omp_wait_policy.upper()} if args.omp_wait_policy else {}

    def record(entry: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    record({"kind": "peak", **worker(["peak", *extra], out / "peak.json", args.timeout, env)})
    for case in cases:
        print(f"[bench] {case}: preparing", flush=True)
        prep = worker(["prepare", "--case", case, *shape], out / "prepare.json", args.timeout)
        if "error" in prep:
            raise SystemExit(f"preparing {case} failed:\n{prep['error']}")
        for r in range(args.repeats):
            for name in interleaved(variants, r):
                steps = steps_for(VARIANTS[name], args.steps)
                start = time.perf_counter()
                res = worker(["run", "--case", case, "--variant", name, "--precision", args.precision,
                              "--warmup", str(args.warmup), "--steps", str(steps), *shape,
                              *extra],
                             out / "run.json", args.timeout, env)
                record({"kind": "run", "case": case, "variant": name, "round": r,
                        "precision": args.precision, **res})
                took = time.perf_counter() - start
                what = res.get("error", "").strip().splitlines()[-1:] if "error" in res else \
                    f"{statistics.fmean(res['step_seconds']):.2f} s/step, " \
                    f"{(res.get('peak_cuda_mb') or res['peak_rss_mb']) / 1024:.2f} GB"
                print(f"[bench] {case} {name} round {r}: {what} ({took:.0f}s)", flush=True)
    record({"kind": "peak", **worker(["peak", *extra], out / "peak.json", args.timeout, env)})
    print(write_summary(out))
    return 0


# ---------------------------------------------------------------- summary

def load(folder: Path) -> tuple[dict, dict]:
    """(best matmul peak per dtype in GFLOP/s, {(case, variant, precision): [run, ...]})."""
    peaks: dict[str, float] = {}
    runs: dict[tuple, list] = {}
    for line in (folder / "runs.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "peak" and "error" not in entry:
            for k in ("fp32", "bf16", "fp32_cpu", "bf16_cpu"):
                peaks[k] = max(peaks.get(k, 0.0), entry.get(k, 0.0))
        elif entry["kind"] == "run" and "error" not in entry:
            runs.setdefault((entry["case"], entry["variant"], entry["precision"]), []).append(entry)
    return peaks, runs


def aggregate(runs: list[dict], peak_gflops: float, peak_cpu_gflops: float) -> dict:
    """Medians over runs of each run's mean per-step figures. `mfu_cpu` divides by CPU time per
    thread instead of wall time (and by the peak measured the same way)."""
    def med(f):
        return statistics.median(f(r) for r in runs)

    step = med(lambda r: statistics.fmean(r["step_seconds"]))
    flops = med(lambda r: statistics.fmean(r["flops"]))
    tokens = med(lambda r: statistics.fmean(r["tokens"]))
    cpu = med(lambda r: statistics.fmean(r["cpu_seconds"]))
    threads = runs[0]["threads"]
    return {"step": step, "cpu": cpu, "mfu_cpu": flops / (cpu / threads) / 1e9 / peak_cpu_gflops,
            "pairs_s": runs[0].get("pairs", DEFAULT_WORKLOAD.pairs) / step, "tokens_s": tokens / step,
            "rss_gb": med(lambda r: r.get("peak_cuda_mb") or r["peak_rss_mb"]) / 1024,
            "gflops": flops / step / 1e9, "mfu": flops / step / 1e9 / peak_gflops,
            "sampling": med(lambda r: sum(r["sampling_seconds"]) / sum(r["step_seconds"])),
            "load": med(lambda r: r.get("load_average", float("nan"))),
            "setup": med(lambda r: r["setup_seconds"]), "runs": len(runs),
            "steps": sum(len(r["step_seconds"]) for r in runs)}


def ratio_rows(table: dict) -> list[str]:
    rows = []
    for num, den, kind, target in RATIOS:
        if num not in table or den not in table:
            continue
        a, b = table[num], table[den]
        value = {"speed": b["step"] / a["step"], "time": a["step"] / b["step"],
                 "memory": a["rss_gb"] / b["rss_gb"]}[kind]
        cpu = {"speed": b["cpu"] / a["cpu"], "time": a["cpu"] / b["cpu"], "memory": value}[kind]
        want = "-" if target is None else (f">= {target}" if kind == "speed" else f"<= {target}")
        met = "-" if target is None else \
            ("met" if (value >= target if kind == "speed" else value <= target) else "NOT met")
        label = {"speed": "pairs/s", "time": "step time", "memory": "peak memory"}[kind]
        rows.append(f"| {num} / {den} | {label} | {value:.2f}x | {cpu:.2f}x | {want} | {met} |")
    return rows


def write_summary(folder: Path) -> str:
    peaks, runs = load(folder)
    lines = [f"Matmul peak (best of the measurements before and after; torch.matmul or F.linear): "
             f"fp32 {peaks.get('fp32', 0):.1f} GFLOP/s, bf16 {peaks.get('bf16', 0):.1f} GFLOP/s per "
             f"wall-clock second; per CPU-second/thread: fp32 {peaks.get('fp32_cpu', 0):.1f}, "
             f"bf16 {peaks.get('bf16_cpu', 0):.1f}",
             "Peak mem: the process's peak RSS on CPU runs; torch.cuda.max_memory_allocated on GPU "
             "runs.", ""]
    for case, precision in sorted({(c, p) for c, _, p in runs}, key=lambda k: list(CASES).index(k[0])):
        peak, peak_cpu = (peaks.get(k) or float("nan") for k in (precision, f"{precision}_cpu"))
        table = {v: aggregate(rs, peak, peak_cpu) for (c, v, p), rs in runs.items() if (c, p) == (case, precision)}
        first = next(rs[0] for (c, _, p), rs in runs.items() if (c, p) == (case, precision))
        work = Workload(first.get("pairs", DEFAULT_WORKLOAD.pairs),
                        first.get("max_length", DEFAULT_WORKLOAD.max_length))
        lines += [f"### {case} ({CASES[case].summary}), {precision}, {work.pairs} pairs a step, "
                  f"prompt + response <= {work.max_length} tokens", "",
                  "| variant | s/step | CPU s/step | pairs/s | tokens/s | peak mem GB | GFLOP/s | "
                  "MFU | gap to peak | MFU (CPU time) | sampling share | load avg | runs x steps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in sorted(table, key=lambda name: list(VARIANTS).index(name)):
            t = table[v]
            lines.append(f"| {v} | {t['step']:.2f} | {t['cpu']:.2f} | {t['pairs_s']:.2f} | "
                         f"{t['tokens_s']:.0f} | {t['rss_gb']:.2f} | {t['gflops']:.1f} | "
                         f"{t['mfu']:.0%} | {1 - t['mfu']:.0%} | {t['mfu_cpu']:.0%} | "
                         f"{t['sampling']:.0%} | "
                         f"{t['load']:.1f} | {t['runs']} x {t['steps'] // max(t['runs'], 1)} |")
        ratios = ratio_rows(table)
        if ratios:
            lines += ["", "| ratio | of | wall clock | CPU time | target | |", "|---|---|---|---|---|---|",
                      *ratios]
        if (case, MFU_TARGET[1]) == MFU_TARGET[:2] and MFU_TARGET[1] in table:
            for key, how in (("mfu", "wall clock"), ("mfu_cpu", "CPU time")):
                mfu = table[MFU_TARGET[1]][key]
                lines.append(f"\nMFU of {MFU_TARGET[1]} ({how}): {mfu:.0%} (target >= "
                             f"{MFU_TARGET[2]:.0%}: {'met' if mfu >= MFU_TARGET[2] else 'NOT met'})")
        lines.append("")
    text = "\n".join(lines)
    (folder / "summary.md").write_text(text)
    return text
