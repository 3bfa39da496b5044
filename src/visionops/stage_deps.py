"""The code each DVC stage runs, derived from its import closure, so that dvc.yaml's deps cannot drift.

A stage's command is `visionops <stage>`: its code is `cli.py` (the module, `main`, the stage's
`@command` function and the cli functions that function calls) plus every visionops module those
import, followed transitively through all imports, including the ones inside functions. A module
that imports by computed name (`importlib.import_module`) brings its whole package, except the task
dispatch: `_task(params).<method>(...)` in cli.py, or `get_task(name).<method>(...)` in a module reached,
brings, for every task, its `task.py` module level and the method of that name (with the methods it
calls on `self`), since `params.yaml`'s `task` (or the dataset's) picks the task.

    python -m visionops.stage_deps           rewrite the src/ deps of every stage in dvc.yaml
    python -m visionops.stage_deps --check   exit 1, listing the differences, when dvc.yaml disagrees
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "visionops"
PACKAGE_DIR = Path(__file__).resolve().parent
CLI = PACKAGE_DIR / "cli.py"
TASKS_PACKAGE = f"{PACKAGE}.tasks"  # get_task imports tasks/<name>/task.py by name: see _task_methods


def _module_file(name: str) -> Path | None:
    """The file of visionops module `name` (a package's __init__.py), or None if it is no module."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(nodes: Iterable[ast.AST], module: str, is_package: bool) -> set[Path]:
    """The visionops module files imported anywhere inside `nodes` (of module `module`)."""
    found: set[Path] = set()
    for node in nodes:
        for sub in ast.walk(node):
            names: list[str] = []
            if isinstance(sub, ast.Import):
                names = [alias.name for alias in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    anchor = module.split(".")
                    anchor = anchor[: len(anchor) - sub.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([sub.module] if sub.module else []))
                else:
                    base = sub.module or ""
                names = [base] + [f"{base}.{alias.name}" for alias in sub.names]
            elif isinstance(sub, ast.Attribute) and sub.attr == "import_module" and module != TASKS_PACKAGE:
                names = [module if is_package else module.rpartition(".")[0]]
                found |= set(PACKAGE_DIR.joinpath(*names[0].split(".")[1:]).rglob("*.py"))
            for name in names:
                path = _module_file(name)
                if path is not None:
                    found.add(path)
    return found


def _with_parents(path: Path) -> set[Path]:
    """`path` and the __init__.py of every package above it (importing a module runs them)."""
    out = {path}
    for parent in path.parents:
        if parent == PACKAGE_DIR.parent:
            break
        init = parent / "__init__.py"
        if init.is_file():
            out.add(init)
    return out


def _dispatched(nodes: Iterable[ast.AST]) -> set[str]:
    """The task methods called in `nodes` as `get_task(...).<method>(...)` or `_task(...).<method>(...)`."""
    return {c.func.attr for n in nodes for c in ast.walk(n) if isinstance(c, ast.Call)
            and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Call)
            and getattr(c.func.value.func, "id", None) in ("get_task", "_task")}


def closure(start: set[Path], methods: set[str] = frozenset()) -> set[Path]:
    """Every visionops module file reachable from `start` through imports, and through the task methods
    (`methods`, and those dispatched in the modules reached) of every task."""
    seen: set[Path] = set()
    task_files: set[Path] = set()  # task.py files: only the dispatched methods' imports count
    methods = set(methods)
    todo = [p for s in start for p in _with_parents(s)]
    while todo:
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            if path in task_files:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            methods |= _dispatched([tree])
            found = _imports([tree], _module_name(path), path.name == "__init__.py")
            todo.extend(p for f in found for p in _with_parents(f) if p not in seen)
        files, imports = _task_methods(methods)
        task_files |= files
        todo.extend(p for f in files | imports for p in _with_parents(f) if p not in seen)
    return seen


def _command_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """cli.py's stage functions by command name (`@command("train", ...)`)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "command" and dec.args:
                    out[ast.literal_eval(dec.args[0])] = node
    return out


def stage_code(stage: str) -> set[Path]:
    """The module files that `visionops <stage>` can run."""
    tree = ast.parse(CLI.read_text(), filename=str(CLI))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    commands = _command_functions(tree)
    if stage not in commands:
        raise KeyError(f"cli.py has no command {stage!r}; commands: {', '.join(sorted(commands))}")
    reached, todo = set(), [commands[stage], functions["main"]]
    while todo:  # the cli functions the stage's function calls, transitively
        fn = todo.pop()
        if fn.name in reached:
            continue
        reached.add(fn.name)
        todo.extend(functions[c.func.id] for c in ast.walk(fn) if isinstance(c, ast.Call) and getattr(c.func, "id", None) in functions)
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    # cli.py itself counts, but only the parts of it that this stage runs are followed
    nodes = top + [functions[name] for name in reached]
    return {CLI} | closure(_imports(nodes, f"{PACKAGE}.cli", False) - {CLI}, _dispatched(nodes))


def _task_methods(methods: set[str]) -> tuple[set[Path], set[Path]]:
    """Every task's task.py, and the modules the task classes' `methods` (and the methods they call on
    self) import."""
    files: set[Path] = set()
    found: set[Path] = set()
    if not methods:
        return files, found
    from visionops.tasks import TASKS

    for name in TASKS:
        path = PACKAGE_DIR / "tasks" / name / "task.py"
        if not path.is_file():  # a task still being written
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        defs = {f.name: f for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body
                if isinstance(f, ast.FunctionDef)}
        reached, todo = set(), [m for m in methods if m in defs]
        while todo:
            fn = todo.pop()
            if fn in reached:
                continue
            reached.add(fn)
            todo.extend(c.func.attr for c in ast.walk(defs[fn]) if isinstance(c, ast.Call)
                        and isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", None) == "self"
                        and c.func.attr in defs)
        top = [n for n in tree.body if not isinstance(n, ast.ClassDef)]
        module = f"{TASKS_PACKAGE}.{name}.task"
        files.add(path)
        found |= _imports(top + [defs[m] for m in reached], module, False) - {path}
    return files, found


def as_deps(files: set[Path], root: Path) -> list[str]:
    """Project-relative paths, a whole directory standing for its .py files when it needs all of them."""

    def compress(directory: Path) -> list[Path]:
        modules = {p for p in directory.rglob("*.py") if "__pycache__" not in p.parts}
        if modules and modules <= files:
            return [directory]
        out = [p for p in sorted(directory.glob("*.py")) if p in files]
        for sub in sorted(d for d in directory.iterdir() if d.is_dir() and d.name != "__pycache__"):
            out += compress(sub)
        return out

    return sorted(p.relative_to(root).as_posix() for p in compress(PACKAGE_DIR))


def expected_deps(dvc_yaml: Path) -> dict[str, list[str]]:
    """Each stage's deps as they should be: its non-code deps as written, then its code."""
    import yaml

    root = dvc_yaml.resolve().parent
    src = PACKAGE_DIR.relative_to(root).parent.as_posix() + "/"
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {
        name: [d for d in stage.get("deps", []) if not str(d).startswith(src)] + as_deps(stage_code(name), root)
        for name, stage in stages.items()
    }


def differences(dvc_yaml: Path) -> list[str]:
    """One line per stage whose code deps in dvc.yaml differ from its import closure."""
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    lines = []
    for name, want in expected_deps(dvc_yaml).items():
        have = stages[name].get("deps", [])
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            lines.append(f"{name}: missing {missing or '-'}; not run by the stage {extra or '-'}")
    return lines


def write(dvc_yaml: Path) -> None:
    """Rewrite each stage's deps in place (ruamel keeps the file's layout and comments)."""
    from ruamel.yaml import YAML

    from visionops.atomic import write_text

    want = expected_deps(dvc_yaml)
    rt = YAML()
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(dvc_yaml.read_text())
    for name, deps in want.items():
        current = doc["stages"][name].get("deps")
        if current is None or list(current) != deps:
            doc["stages"][name]["deps"] = deps
    buf = io.StringIO()
    rt.dump(doc, buf)
    write_text(dvc_yaml, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report differences instead of rewriting dvc.yaml")
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    args = parser.parse_args(argv)
    if args.check:
        diff = differences(args.dvc_yaml)
        for line in diff:
            print(line, file=sys.stderr)
        if diff:
            print("dvc.yaml's code deps are stale: run `make deps`", file=sys.stderr)
        return 1 if diff else 0
    write(args.dvc_yaml)
    return 0


if __name__ == "__main__":
    sys.exit(main())
