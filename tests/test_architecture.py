"""The house's layering (docs/ARCHITECTURE.md): imports point one way, no cycles, light low layers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mrivq"

#: Modules at the top of the package that everything may use.
BASE = {"mrivq", "mrivq.compat", "mrivq.errors", "mrivq.strict_json", "mrivq.config", "mrivq.runtime", "mrivq.run_dir",
        "mrivq.logs"}
#: What each layer may import besides itself (docs/ARCHITECTURE.md, "Dependencies").
ALLOWED = {
    "base": {"base"},
    "data": {"base"},
    "nn": {"base"},
    "metrics": {"base"},
    "compression": {"base", "data", "nn", "metrics"},
    "engine": {"base", "data", "nn", "metrics", "compression"},
    "reporting": {"base", "metrics"},
    "apps": {"base", "data", "nn", "metrics", "compression", "engine", "reporting"},
    "cli": {"base", "apps"},  # each command is an app: its add_arguments and main
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in ("mrivq.cli", "mrivq.__main__", "mrivq.docgen"):  # docgen: the CLI's reference pages
        return "cli"
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """Every mrivq module ``path`` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from mrivq.engine import distributed` imports a module
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {name for name in found if name == "mrivq" or name.startswith("mrivq.")}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert set(map(layer, MODULES)) <= set(ALLOWED)


def test_imports_point_one_way():
    reaches = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
               for name, targets in sorted(GRAPH.items()) for target in sorted(targets)
               if layer(target) != layer(name) and layer(target) not in ALLOWED[layer(name)]]
    assert not reaches, "\n".join(reaches)


def test_no_import_cycles():
    def cycle_from(start):
        stack, on_path, done = [(start, iter(sorted(GRAPH[start])))], [start], set()
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                return on_path[on_path.index(child):] + [child]
            elif child in GRAPH and child not in done:
                stack.append((child, iter(sorted(GRAPH[child]))))
                on_path.append(child)
        return None

    cycles = [cycle for cycle in map(cycle_from, sorted(GRAPH)) if cycle]
    assert not cycles, " -> ".join(cycles[0])


def test_the_checker_sees_a_cycle_and_an_upward_reach():
    """The two tests above would fail on a house with these faults."""
    global GRAPH
    saved = GRAPH
    GRAPH = {**saved, "mrivq.nn.vqvae2": saved["mrivq.nn.vqvae2"] | {"mrivq.engine.loop"},
             "mrivq.engine.loop": saved["mrivq.engine.loop"] | {"mrivq.nn.vqvae2"}}
    try:
        with pytest.raises(AssertionError, match="mrivq.nn.vqvae2 \\(nn\\) imports mrivq.engine.loop"):
            test_imports_point_one_way()
        with pytest.raises(AssertionError, match="mrivq.nn.vqvae2"):
            test_no_import_cycles()
    finally:
        GRAPH = saved


@pytest.mark.parametrize("package", ["mrivq.nn", "mrivq.compression", "mrivq.data", "mrivq.metrics"])
def test_low_layers_do_not_pull_in_matplotlib_or_the_apps(package):
    """Every module of the package imported, then nothing of matplotlib or the upper layers loaded."""
    modules = ", ".join(name for name in sorted(MODULES) if name.startswith(package))
    code = (f"import sys, {modules}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' "
            "or m.startswith(('mrivq.apps', 'mrivq.engine', 'mrivq.reporting'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


#: Functions allowed past MAX_FUNCTION_LINES, by (module, name).
LONG_FUNCTIONS = {
    ("mrivq.data.phantom", "_draw_anatomy"),  # the phantom's drawing: one anatomy, painted in order
}
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    """Every function and method, from ``def`` to its last line, fits in MAX_FUNCTION_LINES."""
    long = []
    for name, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (name, node.name) not in LONG_FUNCTIONS:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()


def test_a_command_imports_its_own_app_only():
    """``mrivq decode`` reads its own flags only: the other commands (and what they import) stay unloaded."""
    loaded = _loaded_after("from mrivq.cli import build_parser\nbuild_parser('decode').parse_args("
                           "['decode', '--checkpoint', 'm.pt', '--out', 'd', 'c.mrvq'])")
    assert [m for m in loaded if m.startswith("mrivq.apps.")] == ["mrivq.apps.decode", "mrivq.apps.flags"]
    assert "matplotlib" not in loaded
    every = _loaded_after("from mrivq.cli import build_parser\nbuild_parser()")  # mrivq --help: all of them
    assert {"mrivq.apps.train", "mrivq.apps.sample", "mrivq.apps.bench"} <= set(every)


def test_checking_a_checkpoints_shapes_does_not_import_torchs_symbolic_shapes():
    """The shapes-only build of every model (meta device, initialisers skipped) runs no torch
    reference implementation, whose first use imports sympy and torch's symbolic shapes
    (a third of a second of every command that loads a model)."""
    loaded = _loaded_after(
        "from mrivq.engine.checkpoint import _shapes_only\nfrom mrivq.nn import VQVAE2\n"
        "from mrivq.nn.pass_prior import PassPrior\nfrom mrivq.nn.transformer_prior import TransformerPrior\n"
        "with _shapes_only():\n    VQVAE2(); PassPrior(512, (32, 16)); TransformerPrior(512, (32, 16))")
    assert "sympy" not in loaded and "torch.fx.experimental.symbolic_shapes" not in loaded
