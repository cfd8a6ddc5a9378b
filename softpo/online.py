"""Online SPO: preference rows drawn from the current policy and labelled by an expert during training.

At every refresh step (`online.start`, then every `online.every` steps) `Online.refresh`:
  1. takes the next `prompts_per_refresh` prompts of a seeded stream over the prompt set
     (`softpo.collate.stream_indices`; refresh k reads positions [k * P, (k + 1) * P));
  2. splits them into groups of `sample_batch` prompts; process r samples groups r, r + W, ...
     from the current policy, `responses` answers per prompt (pure sampling, `softpo.sampling`),
     each group with a seed that is a function of (train.seed, step, group) alone;
  3. gathers every process's answers (`gather`, Accelerate's `gather_object`), so that every
     process holds all of them, in prompt order;
  4. scores each distinct (prompt, answer) not scored before, the new ones shared out among the
     processes, once: rewards are cached by (prompt, text) across refreshes and gathered too;
  5. labels each prompt's distinct answers exactly as `softpo build-prefs` does
     (`softpo.prefs.label_prompt`, with a generator seeded by (train.seed, step, stream position)),
     tokenises the rows and puts them into the online pool (`online.buffer` refreshes kept).
Batches then read the pool (`source`; with `online.mix: append`, the offline rows too) in a seeded
permutation stream that restarts at each refresh. Since samples, rewards and labels depend on the
step, the group and the seed only, N processes build exactly the rows one process builds, and a
resumed run the rows the uninterrupted run built. The rows of the kept refreshes came from a policy
a resumed run no longer has, so checkpoints carry them, with the reward cache (`save` / `load`,
one JSON file written by the main process).
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from softpo.checkpoint import write_json_atomic
from softpo.collate import TokenizedExample, stream_indices, tokenize_example, tokenize_examples
from softpo.config import Config
from softpo.data import DataReport, PreferenceExample, to_example
from softpo.errors import UserError
from softpo.prefs import BuildStats, Labelling, distinct_responses, label_prompt, prompt_key
from softpo.readers import BadRowError
from softpo.sampling import sample_prompts

STATE = "online.json"  # in checkpoints: the kept refreshes' rows and the reward cache
Gather = Callable[[list], list]  # every process's list, concatenated in process order


def group_seed(seed: int, step: int, group: int) -> int:
    """The sampling seed of prompt group `group` at refresh step `step` (63 bits)."""
    digest = hashlib.sha256(f"online:{seed}:{step}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pool_seed(seed: int, step: int) -> int:
    """The seed of the batch stream that starts at refresh step `step`."""
    return seed * 1_000_003 + step + 11


@dataclass
class Refresh:
    """The rows one refresh produced, as labelled and as tokenised."""

    step: int
    rows: list[dict]
    examples: list[TokenizedExample]


class Online:
    """Online refreshes: sampling, the expert, labelling, the pool of rows, the checkpoint file.

    `prompts` are the prompts to answer (strings or conversations, already chat-wrapped); `scorer`
    the expert, `scorer(prompts, responses) -> rewards` (`softpo.tasks.experts.load_scorer`; by
    default built from `online.expert` / `online.reward_model`); `has_offline`: whether the run
    has offline training rows (`mix: append` may then go on with an empty pool). Before the first
    refresh the pool is empty and `last` is None.
    """

    def __init__(self, cfg: Config, prompts: list, tokenizer, device=None, scorer=None,
                 has_offline: bool = False):
        o = cfg.online
        if not prompts:
            raise UserError("config key 'online.prompts': no prompts to answer")
        self.cfg, self.prompts, self.tokenizer = cfg, prompts, tokenizer
        self.has_offline = has_offline
        self._check_prompts()
        if scorer is None:
            from softpo.tasks.experts import load_scorer

            scorer, _ = load_scorer(o.expert, o.reward_model, device=device or "cpu")
        self.scorer = scorer
        self.labelling = Labelling(o.format, o.pairing, o.bt_temperature, o.pairs_per_prompt,
                                   o.keep_ties)
        self.rewards: dict[tuple[str, str], float] = {}  # (prompt_key, text) -> reward
        self.kept: list[Refresh] = []
        self.examples: list[TokenizedExample] = []  # the pool: the kept refreshes' rows
        self.last: int | None = None  # step of the latest refresh

    def _check_prompts(self) -> None:
        """Every prompt must leave room for an answer (data.max_length), as training rows must."""
        source = self.cfg.online.prompts or "the training prompts"
        for i, prompt in enumerate(self.prompts):
            answer = "a" if isinstance(prompt, str) else [{"role": "assistant", "content": "a"}]
            try:
                tokenize_example(PreferenceExample(prompt, [answer, answer]), self.tokenizer,
                                 self.cfg.data)
            except BadRowError as e:
                raise BadRowError(e.detail, reason=e.reason, source=source, row=i + 1,
                                  field="prompt") from None

    # ---------------------------------------------------------------- schedule and batches

    def due(self, step: int) -> bool:
        """Whether step `step` starts with a refresh."""
        o = self.cfg.online
        return step >= o.start and (step - o.start) % o.every == 0

    def last_refresh_step(self, step: int) -> int | None:
        """The latest refresh step <= `step` (None before the first)."""
        o = self.cfg.online
        return None if step < o.start else step - (step - o.start) % o.every

    def source(self, step: int, offline: list, seed: int) -> tuple[list, int, int]:
        """What step `step` reads: (examples, the step their stream starts at, its seed).
        Before the first refresh the offline rows from step 0; then the pool (`mix: append`:
        offline rows + pool) from the latest refresh step on."""
        refreshed = self.last_refresh_step(step)
        if refreshed is None:
            return offline, 0, seed
        examples = offline + self.examples if self.cfg.online.mix == "append" else self.examples
        return examples, refreshed, pool_seed(seed, refreshed)

    # ---------------------------------------------------------------- a refresh

    def refresh(self, policy: nn.Module, step: int, rank: int = 0, world: int = 1, device=None,
                gather: Gather = lambda x: x) -> dict[str, float]:
        """New rows for refresh step `step` from `policy` (module docstring); every process
        calls it with its `rank` and ends with the same pool. Returns the refresh's metrics."""
        o, seed = self.cfg.online, self.cfg.train.seed
        k, P = (step - o.start) // o.every, o.prompts_per_refresh
        picks = stream_indices(len(self.prompts), k * P, P, seed + 2)  # (P,) prompt indices
        samples = sorted(gather(self._sample(policy, step, picks, rank, world, device)),
                         key=lambda s: s[0])  # (position, texts, cut) per prompt, in order
        prompts = [self.prompts[picks[i]] for i, _, _ in samples]
        distinct = [distinct_responses(texts) for _, texts, _ in samples]
        calls = self._score(prompts, [kept for kept, _ in distinct], rank, world, gather, step)
        stats, rows = BuildStats(prompts=P), []
        for (i, _, unfinished), prompt, (kept, where) in zip(samples, prompts, distinct):
            rewards = [self.rewards[prompt_key(prompt), t] for t in kept]
            rng = random.Random(f"online:{seed}:{step}:{k * P + i}")
            rows += label_prompt(prompt, kept, where, rewards, self.labelling, rng, stats)
            stats.unfinished += unfinished
        self._keep(step, rows)
        if not (self.examples or o.mix == "append" and self.has_offline):
            raise UserError(f"online refresh at step {step}: no preference rows from {P} prompts "
                            f"({stats.skipped_ties} with all answers tied, "
                            f"{stats.skipped_too_few} with fewer than two distinct answers); "
                            "raise online.responses or set online.keep_ties")
        metrics = {"online/rows": float(len(rows)), "online/expert_calls": float(calls),
                   "online/pool": float(len(self.examples))}
        if stats.rewards:
            metrics["online/reward_mean"] = statistics.fmean(stats.rewards)
        return metrics

    def _sample(self, policy: nn.Module, step: int, picks: list[int], rank: int, world: int,
                device) -> list[tuple[int, list[str], int]]:
        """This process's groups of prompts answered: (position in the refresh, the answers'
        texts, how many were cut at max_new_tokens) per prompt."""
        o = self.cfg.online
        G, n, out = o.sample_batch, o.responses, []
        for g in range(rank, -(-len(picks) // G), world):
            positions = range(g * G, min((g + 1) * G, len(picks)))
            batch = sample_prompts(policy, self.tokenizer, [self.prompts[picks[i]] for i in positions],
                                   self.cfg.data, n, o.max_new_tokens,
                                   group_seed(self.cfg.train.seed, step, g), device=device)
            texts, cut = batch.texts(self.tokenizer), (~batch.finished).tolist()
            out += [(i, texts[j * n:(j + 1) * n], sum(cut[j * n:(j + 1) * n]))
                    for j, i in enumerate(positions)]
        return out

    def _score(self, prompts: list, answers: list[list[str]], rank: int, world: int,
               gather: Gather, step: int) -> int:
        """Score every (prompt, answer) not in the reward cache, once, the processes sharing the
        work; every process's cache gets every reward. Returns the number scored."""
        todo, seen = [], set()
        for prompt, kept in zip(prompts, answers):
            for text in kept:
                key = (prompt_key(prompt), text)
                if key not in self.rewards and key not in seen:
                    seen.add(key)
                    todo.append((prompt, text))
        mine, error, values = todo[rank::world], None, []
        try:
            values = list(self.scorer([p for p, _ in mine], [t for _, t in mine])) if mine else []
            if len(values) != len(mine):
                error = f"the expert returned {len(values)} rewards for {len(mine)} answers"
        except UserError as e:
            error = str(e)
        results = sorted(gather([(rank, values, error)]), key=lambda x: x[0])
        for _, _, problem in results:
            if problem is not None:
                raise UserError(f"online refresh at step {step}: {problem}")
        for r, got, _ in results:
            for (prompt, text), value in zip(todo[r::world], got):
                self.rewards[prompt_key(prompt), text] = float(value)
        return len(todo)

    def _keep(self, step: int, rows: list[dict]) -> None:
        """Tokenise a refresh's rows and make the pool the last `online.buffer` non-empty
        refreshes."""
        self.last = step
        if not rows:
            return
        name = f"online step {step}"
        examples = [to_example(row, name, i + 1) for i, row in enumerate(rows)]
        report = DataReport(source=name, rows_kept=len(examples))
        self.kept.append(Refresh(step, rows, tokenize_examples(examples, self.tokenizer,
                                                               self.cfg.data, report)))
        if self.cfg.online.buffer:
            self.kept = self.kept[-self.cfg.online.buffer:]
        self.examples = [e for r in self.kept for e in r.examples]

    # ---------------------------------------------------------------- checkpoints

    def save(self, directory: Path) -> None:
        """Write the kept rows and the reward cache into a checkpoint folder (main process)."""
        if self.last is None:
            return
        state = {"last": self.last, "refreshes": [{"step": r.step, "rows": r.rows}
                                                  for r in self.kept],
                 "rewards": [[key, text, value] for (key, text), value in self.rewards.items()]}
        write_json_atomic(Path(directory) / STATE, state)

    def load(self, directory: Path) -> None:
        """Take the rows and rewards saved in a checkpoint folder (none: no refresh yet)."""
        self.rewards, self.kept, self.examples, self.last = {}, [], [], None
        path = Path(directory) / STATE
        if not path.is_file():
            return
        state = json.loads(path.read_text(encoding="utf-8"))
        self.rewards = {(key, text): float(value) for key, text, value in state["rewards"]}
        for refresh in state["refreshes"]:
            self._keep(int(refresh["step"]), refresh["rows"])
        self.last = int(state["last"])
