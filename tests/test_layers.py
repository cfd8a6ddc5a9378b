"""The module graph (DESIGN.md section 2): imports go one way, down a declared order of layers, with
no circle; argument parsing lives only in the command modules; `import softpo` and `softpo --help`
load nothing heavy.

Every import statement of every softpo module is read with `ast`, function-level imports included
(they are imports all the same, only later). `from softpo.x import y` counts as importing
`softpo.x.y` when that is a module, else `softpo.x`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "softpo"

# Lowest first. A module may import from its own layer and the layers below it, never above.
LAYERS: list[tuple[str, list[str]]] = [
    ("ground floor: imports nothing of softpo",
     ["softpo.errors", "softpo.hardware", "softpo.losses", "softpo.checkpoint", "softpo.tracking",
      "softpo.distributed", "softpo.preemption"]),
    ("the documented config", ["softpo.config"]),
    ("files -> validated rows", ["softpo.readers", "softpo.data"]),
    ("models and model helpers", ["softpo.models"]),
    ("rows -> tokens -> batches; padded and packed layouts; the tokenised set on disk",
     ["softpo.collate", "softpo.packing", "softpo.tokcache"]),
    ("log-probs", ["softpo.logprobs"]),
    ("fresh samples", ["softpo.sampling"]),
    ("the global KL regulariser; cached reference log-probs",
     ["softpo.regularizer", "softpo.refcache"]),
    ("experts, expert-labelled preferences; online SPO",
     ["softpo.tasks.experts", "softpo.prefs", "softpo.online"]),
    ("assembling a run; the loop; exporting its model",
     ["softpo.report", "softpo.build", "softpo.trainer", "softpo.export"]),
    ("numbers, task families",
     ["softpo.evaluation", "softpo.sampled_eval", "softpo.candidates", "softpo.plots",
      "softpo.tasks", "softpo.tasks.arithmetic", "softpo.tasks.choices"]),
    ("the Python API", ["softpo.api"]),
    ("labs and the demo",
     ["softpo.lab", "softpo.lab.optima", "softpo.lab.seqoptima", "softpo.lab.plots",
      "softpo.lab.seqmodel", "softpo.lab.tabular", "softpo.lab.sequence", "softpo.lab.seqreport",
      "softpo.demo_eval", "softpo.demo_report", "softpo.demo"]),
    ("the command line and the public face",
     ["softpo.commands", "softpo.lab.commands", "softpo.cli", "softpo"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
COMMAND_MODULES = {"softpo.commands", "softpo.lab.commands", "softpo.cli"}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (`softpo` for softpo/__init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, source: str, known: set[str], is_package: bool = False) -> dict[str, int]:
    """The softpo modules `source` (module `name`) imports, anywhere in it: module -> line."""
    out: dict[str, int] = {}
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target == "softpo" or target.startswith("softpo."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    out.setdefault(target, node.lineno)
    return out


def graph() -> dict[str, dict[str, int]]:
    files = module_files()
    known = set(files)
    return {name: imported(name, path.read_text(encoding="utf-8"), known,
                           path.name == "__init__.py") for name, path in files.items()}


def test_the_scanner_sees_function_level_and_relative_imports():
    source = ("import os\nfrom softpo.config import Config\n\ndef f():\n"
              "    from softpo import trainer\n    import softpo.lab.seqmodel\n"
              "    from . import losses\n    from .lab import seqreport\n")
    known = {"softpo", "softpo.config", "softpo.trainer", "softpo.lab", "softpo.lab.seqmodel",
             "softpo.lab.seqreport", "softpo.losses"}
    assert imported("softpo.build", source, known) == {
        "softpo.config": 2, "softpo.trainer": 5, "softpo.lab.seqmodel": 6, "softpo.losses": 7,
        "softpo.lab.seqreport": 8}


def test_every_module_has_a_layer():
    unplaced = sorted(set(module_files()) - set(LAYER))
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"


def test_imports_only_go_down():
    files, upward = module_files(), []
    for name, targets in graph().items():
        for target, line in targets.items():
            if LAYER[target] > LAYER[name]:
                upward.append(f"{files[name].relative_to(ROOT)}:{line}: {name} "
                              f"({LAYERS[LAYER[name]][0]}) imports {target} "
                              f"({LAYERS[LAYER[target]][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_there_is_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else path + [target]
            if target not in state and (circle := visit(target, path + [target])):
                return circle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            circle = visit(module, [module])
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_argument_parsing_only_in_the_command_modules():
    offenders = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names and name not in COMMAND_MODULES:
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"argparse imported by library modules: {offenders}"


def test_import_softpo_and_help_load_no_torch():
    """The public names resolve lazily: `import softpo` and `softpo --help` import no torch."""
    code = ("import sys\nimport softpo\nfrom softpo import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, sorted(n for n in dir(softpo) if not n.startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last == "False ['Config', 'Trainer', 'UserError', 'load_config', 'losses', 'train']"


def test_public_names_are_the_library_objects():
    import softpo
    from softpo import api, config, errors, losses, trainer

    assert softpo.train is api.train and softpo.Trainer is trainer.Trainer
    assert softpo.Config is config.Config and softpo.load_config is config.load_config
    assert softpo.losses is losses and softpo.losses.register is losses.register
    assert softpo.UserError is errors.UserError
