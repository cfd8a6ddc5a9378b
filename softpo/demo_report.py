"""The demo's results: `results.json` (the stable structure below), `results.md` and the PNGs.

One run (one seed), `kind: "run"`:

    schema     "softpo-demo/2"
    kind       "run"
    task, model, seed
    precision  {"train": "bf16 autocast" | "float32", "eval": "float32"}
    settings   every setting of the run: softpo.demo.DemoSettings's fields, `recipe` (the task's
               data and sampling recipe, softpo.demo.Recipe) and `training` (the fixed training
               settings: LoRA, packing, warm-up, lengths, the regulariser's sampling)
    data       the preference file's build statistics (softpo.prefs.BuildStats.summary: prompts,
               rows, responses, distinct, duplicates, tied, reward_mean, success_rate, ...)
    expert     the exact metrics of the expert distribution softmax(r / T) itself, T the labels'
               Bradley-Terry temperature (null for a task without candidate sets)
    seconds    wall-clock seconds per phase: load (model conversion and loading), data,
               train/<run>, eval/<name>, total
    cpu_seconds  the same phases in CPU seconds of the process, all threads (a shared machine
               inflates them less than the wall clock)
    models     one entry per evaluated model, in plan order:
        name         e.g. reference, spo_alpha1, dpo_beta0.1, dpo_beta0.1_T1.5
        method       reference, spo, dpo, hdpo or fdpo
        loss         the softpo loss (null for the reference)
        knobs        the loss's varied hyper-parameters: spo {alpha, beta}, dpo {beta},
                     hdpo {alpha, beta}, fdpo {beta, f_divergence}, reference {}
        temperature  what it is sampled and scored at (1: the model itself)
        run          the training's folder name (shared by a model's temperatures); null for
                     the reference
        metrics
          exact      softpo.candidates means over held-out prompts: success, outside,
                     entropy (normalised, among the correct answers), coverage, top_share,
                     kl_uniform, kl_expert (to softmax(r / T)), reward, num_correct,
                     num_candidates, prompts; null for a task without candidate sets
          sampled    softpo.sampled_eval: reward, reward_sd, reward_se, success, pass@1..pass@k,
                     distinct_correct, distinct_1, distinct_2, self_similarity, length,
                     truncated, kl (to the reference; null at T != 1), entropy (null at T != 1),
                     prompts, samples
          train      the final training metrics (loss, pref_loss, kl, rewards/accuracies,
                     rewards/margins, grad_norm); null for the reference

Several seeds or `--sweep`, `kind: "sweep"` (or `"seeds"` without --sweep): task, model, seeds,
precision, settings, seconds {total}, `runs` (each seed's run document above, also written to
`seed<S>/results.json`), `expert` (its means over seeds) and `summary`: one entry per model with
name, method, loss, knobs, temperature, run, `seeds` (how many) and `mean` and `sd` (standard
deviation over seeds, 0 for one seed), each `{"exact": {...} | null, "sampled": {...}}` with the
keys above.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from softpo.report import markdown_table

SCHEMA = "softpo-demo/2"

# (section, key, column) of the tables: tasks with candidate sets, and the others
EXACT_COLUMNS = [("exact", "success", "success prob."), ("exact", "outside", "mass outside"),
                 ("exact", "entropy", "entropy among right"), ("exact", "coverage", "coverage"),
                 ("exact", "kl_expert", "KL to expert"), ("sampled", "pass@1", "pass@1"),
                 ("sampled", "pass@{k}", "pass@{k}"),
                 ("sampled", "distinct_correct", "different right / {k}"),
                 ("sampled", "kl", "KL to ref")]
SAMPLED_COLUMNS = [("sampled", "reward", "expert reward"), ("sampled", "success", "success rate"),
                   ("sampled", "pass@{k}", "pass@{k}"), ("sampled", "kl", "KL to ref (nats)"),
                   ("sampled", "entropy", "entropy (nats/seq)"),
                   ("sampled", "distinct_1", "distinct-1"), ("sampled", "distinct_2", "distinct-2"),
                   ("sampled", "length", "tokens")]


# ---------------------------------------------------------------- documents

def run_document(s, seed: int, settings: dict, bf16: bool, data: dict, expert: dict | None,
                 clock, models: list[dict]) -> dict:
    """One seed's results (module docstring); `bf16`: training ran under bf16 autocast; `clock`
    a `softpo.demo_eval.Clock`."""
    return {"schema": SCHEMA, "kind": "run", "task": s.task, "model": s.model, "seed": seed,
            "precision": {"train": "bf16 autocast" if bf16 else "float32", "eval": "float32"},
            "settings": settings, "data": data, "expert": expert, "seconds": dict(clock.wall),
            "cpu_seconds": dict(clock.cpu), "models": models}


def _mean_sd(values: list) -> tuple:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _section_stats(sections: list[dict | None]) -> tuple[dict | None, dict | None]:
    """Mean and sd over seeds of every number of one metrics section (None where none has it)."""
    present = [x for x in sections if x]
    if not present:
        return None, None
    keys = dict.fromkeys(k for x in present for k in x)
    stats = {k: _mean_sd([x.get(k) for x in present]) for k in keys}
    return {k: m for k, (m, _) in stats.items()}, {k: d for k, (_, d) in stats.items()}


def seed_summary(runs: list[dict]) -> list[dict]:
    """One entry per model: its description, the number of seeds, mean and sd over seeds."""
    names = dict.fromkeys(m["name"] for run in runs for m in run["models"])
    out = []
    for name in names:
        entries = [m for run in runs for m in run["models"] if m["name"] == name]
        head = {k: entries[0][k] for k in ("name", "method", "loss", "knobs", "temperature", "run")}
        mean, sd = {}, {}
        for section in ("exact", "sampled"):
            mean[section], sd[section] = _section_stats([e["metrics"][section] for e in entries])
        out.append({**head, "seeds": len(entries), "mean": mean, "sd": sd})
    return out


def sweep_document(s, runs: list[dict], seconds: float) -> dict:
    """Every seed's run and their means (module docstring)."""
    expert, _ = _section_stats([r["expert"] for r in runs])
    first = runs[0]
    return {"schema": SCHEMA, "kind": "sweep" if s.sweep else "seeds", "task": s.task,
            "model": s.model, "seeds": list(s.seeds), "precision": first["precision"],
            "settings": first["settings"], "seconds": {"total": seconds}, "expert": expert,
            "summary": seed_summary(runs), "runs": runs}


# ---------------------------------------------------------------- tables

def _k(doc: dict) -> int:
    return doc["settings"]["recipe"]["eval_samples"]


def _columns(doc: dict) -> list[tuple[str, str, str]]:
    k = _k(doc)
    has_exact = doc.get("expert") is not None
    return [(sec, key.format(k=k), label.format(k=k))
            for sec, key, label in (EXACT_COLUMNS if has_exact else SAMPLED_COLUMNS)]


def _value(metrics: dict, section: str, key: str):
    part = metrics.get(section) or {}
    value = part.get(key)
    return float(value) if isinstance(value, (int, float)) else "-"


def results_table(doc: dict) -> str:
    """The Markdown table of a run (a row per model) or of a sweep (mean ± sd over seeds)."""
    if doc["kind"] != "run":
        return summary_table(doc)
    columns = _columns(doc)
    header = ["model", "T", *[label for _, _, label in columns], "train (s)", "eval (s)"]
    rows = []
    for m in doc["models"]:
        seconds = doc["seconds"]
        rows.append([m["name"], m["temperature"],
                     *[_value(m["metrics"], sec, key) for sec, key, _ in columns],
                     seconds.get(f"train/{m['run']}", "-"), seconds.get(f"eval/{m['name']}", "-")])
    return markdown_table(header, rows)


def summary_table(doc: dict) -> str:
    """Mean ± sd over seeds, a row per model."""
    columns = _columns(doc)
    header = ["model", "T", "seeds", *[label for _, _, label in columns]]
    rows = []
    for m in doc["summary"]:
        cells = []
        for sec, key, _ in columns:
            mean, sd = _value(m["mean"], sec, key), _value(m["sd"], sec, key)
            cells.append("-" if mean == "-" else f"{mean:.3f} ± {sd:.3f}")
        rows.append([m["name"], m["temperature"], m["seeds"], *cells])
    return markdown_table(header, rows)


# ---------------------------------------------------------------- Markdown and files

def _labels(r: dict) -> str:
    """How the recipe `r` labels the sampled answers, in words."""
    if r["pairing"] != "bt":
        how = "best-versus-worst pairs"
    else:
        pairs = "every pair of distinct answers" if not r["pairs_per_prompt"] else \
            f"{r['pairs_per_prompt']} pair(s) per prompt"
        how = f"Bradley-Terry labels at temperature {r['bt_temperature']:g} on {pairs}"
    return how + (", two answers of equal reward compared by a fair coin" if r["keep_ties"]
                  else ", ties dropped")


def describe(doc: dict) -> str:
    """What was run, in one paragraph."""
    st, r, t = doc["settings"], doc["settings"]["recipe"], doc["settings"]["training"]
    prec = doc["precision"]
    return (f"Model `{doc['model']}` with LoRA on task `{doc['task']}`: {st['train_prompts']} "
            f"training prompts x {r['responses']} sampled answers (at most "
            f"{st['max_new_tokens']} new tokens) labelled by the task's programmatic expert, "
            f"{_labels(r)}; one preference file per seed, shared by every method. Every method: "
            f"{st['steps']} steps of {st['batch_size']} pairs, lr {st['lr']:g} (warm-up "
            f"{t['warmup_steps']}), LoRA r {t['lora_r']}; SPO with the global KL regulariser (beta "
            f"{st['spo_beta']:g}; {t['reg_prompts']} prompts x {t['reg_samples']} samples x "
            f"{t['reg_tokens']} tokens every {t['reg_every']} steps). Training in {prec['train']}, "
            f"evaluation in {prec['eval']}. Held out: {st['eval_prompts']} prompts, every "
            f"candidate answer's exact probability where the task has candidate sets, and "
            f"{r['eval_samples']} sampled answers per prompt.")


GLOSSARY = (
    "T: the temperature the model is sampled and scored at. success prob.: exact probability "
    "that one sample is a right answer; mass outside: probability of answers that are no "
    "candidate; entropy among right: entropy of the model among the right answers over log(number "
    "right), 1 = equal shares (the expert's); coverage: share of right answers holding at least "
    "half their equal share; KL to expert: KL(model on the candidates || softmax(r / T_labels)); "
    "pass@k: unbiased estimate from the samples; different right / k: different right answers "
    "among the k samples; KL to ref: Monte Carlo, nats per answer (T = 1 only).")


def run_markdown(doc: dict, images: list[str]) -> str:
    """results.md of one run."""
    d, sec = doc["data"], doc["seconds"]
    data = (f"Preference file: {d.get('rows')} pairs ({d.get('tied')} between answers of equal "
            f"reward) from {d.get('prompts')} prompts; the samples' success rate "
            f"{d.get('success_rate', float('nan')):.3f}.")
    cpu = doc.get("cpu_seconds", {})
    times = ", ".join(f"{k} {v:g} s" + (f" ({cpu[k]:g} s CPU)" if k in cpu else "")
                      for k, v in sec.items())
    lines = [f"# softpo demo: {doc['task']}, seed {doc['seed']}", "", describe(doc), "",
             results_table(doc), "", GLOSSARY, "", data, "", f"Seconds per phase: {times}.", ""]
    return "\n".join(lines + [f"![{name}]({name})" for name in images]) + "\n"


def sweep_markdown(doc: dict, images: list[str]) -> str:
    """results.md of several seeds: mean ± sd over seeds, links to each seed's report."""
    lines = [f"# softpo demo {'sweep' if doc['kind'] == 'sweep' else 'seeds'}: {doc['task']}, "
             f"seeds {', '.join(map(str, doc['seeds']))}", "", describe(doc["runs"][0]), "",
             "Mean ± standard deviation over seeds:", "", results_table(doc), "", GLOSSARY, "",
             "Each seed's report: " + ", ".join(f"[seed {r['seed']}](seed{r['seed']}/results.md)"
                                               for r in doc["runs"]) +
             f". Total {doc['seconds']['total']:g} s.", ""]
    return "\n".join(lines + [f"![{name}]({name})" for name in images]) + "\n"


def _write(path: Path, text: str) -> None:
    from softpo.prefs import write_atomic

    write_atomic(path, text)


def write_run(doc: dict, out: Path) -> Path:
    """results.json, results.md and the PNGs of one run in `out`."""
    from softpo.plots import demo_plots

    images = demo_plots(doc, out)
    _write(out / "results.json", json.dumps(doc, indent=1) + "\n")
    _write(out / "results.md", run_markdown(doc, images))
    return out / "results.md"


def write_sweep(doc: dict, out: Path) -> Path:
    """results.json, results.md and frontier.png of several seeds in `out`."""
    from softpo.plots import frontier_plot

    images = [frontier_plot(doc, out / "frontier.png").name] if doc["expert"] else []
    _write(out / "results.json", json.dumps(doc, indent=1) + "\n")
    _write(out / "results.md", sweep_markdown(doc, images))
    return out / "results.md"
