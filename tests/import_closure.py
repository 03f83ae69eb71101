"""The project modules a script can import: a static walk of `import sdn...` / `from sdn... import`
statements, function-level ones included, resolving packages to their `__init__.py`.

A module-level `__getattr__` (PEP 562: how the package `sdn` serves `SDNLayer` and
`ResSDNLayer` on first use) is followed only for the names it serves that some module of the
closure imports by name (`from sdn import SDNLayer`), or for all its names when a module is
imported whole (`import sdn.config`), since any attribute may then be looked up.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sdn"


def module_file(root: Path, module: str) -> Path | None:
    path = root.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _lazy_imports(function: ast.FunctionDef) -> list[tuple[set[str] | None, ast.AST]]:
    """Each import inside a `__getattr__`, with the names whose branch it sits in (None: any)."""
    found: list[tuple[set[str] | None, ast.AST]] = []

    def visit(node: ast.AST, names: set[str] | None) -> None:
        if isinstance(node, ast.If):
            served = _branch_names(node.test)
            for child in node.body:
                visit(child, served if served is not None else names)
            for child in node.orelse:
                visit(child, names)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((names, node))
        for child in ast.iter_child_nodes(node):
            visit(child, names)

    for statement in function.body:
        visit(statement, None)
    return found


def _branch_names(test: ast.expr) -> set[str] | None:
    """The names of `if name in ("a", "b")` / `if name == "a"`; None for any other test."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.left, ast.Name):
        (op,), (right,) = test.ops, test.comparators
        if isinstance(op, ast.Eq) and isinstance(right, ast.Constant):
            return {right.value}
        if isinstance(op, ast.In) and isinstance(right, (ast.Tuple, ast.List, ast.Set)):
            if all(isinstance(item, ast.Constant) for item in right.elts):
                return {item.value for item in right.elts}
    return None


class _Module:
    def __init__(self, root: Path, name: str, path: Path) -> None:
        self.name, self.path = name, path
        tree = ast.parse(path.read_text(), str(path))
        self.is_package = path.name == "__init__.py"
        lazy = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
        self.lazy = _lazy_imports(lazy[0]) if lazy else []
        skipped = {id(node) for _, node in self.lazy}
        self.imports = [
            node for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped
        ]
        self.bound: set[str] = set()  # names bound at module level
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bound.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = (n for target in targets for n in ast.walk(target))
                self.bound |= {n.id for n in names if isinstance(n, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}


def import_closure(script: Path, root: Path) -> set[Path]:
    """Every project file (relative to `root`) that running `script` may execute, `script` included."""
    modules: dict[str, _Module] = {}
    requested: dict[str, set[str] | None] = {}  # module -> names imported from it (None: whole module)
    files: set[Path] = set()
    todo: list[tuple[Path, str]] = [(script, "__main__")]

    def want(module: str) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            name = ".".join(parts[:i])
            path = module_file(root, name)
            if path is not None and name not in modules:
                modules[name] = _Module(root, name, path)
                todo.append((path, name))

    def request(module: str, names: set[str] | None) -> None:
        if module not in modules:
            return
        old = requested.get(module, set())
        requested[module] = None if names is None or old is None else old | names

    def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
        if not node.level:
            return node.module or ""
        base = current.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        return ".".join(base + ([node.module] if node.module else []))

    def handle(node: ast.AST, current: str, is_package: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                beside = script.parent / f"{alias.name}.py"  # the script's folder comes first on sys.path
                if current == "__main__" and beside.is_file() and alias.name not in modules:
                    modules[alias.name] = _Module(root, alias.name, beside)
                    todo.append((beside, alias.name))
                elif alias.name.split(".")[0] == PACKAGE:
                    want(alias.name)
                    request(alias.name if alias.asname else PACKAGE, None)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(node, current, is_package)
            if source.split(".")[0] != PACKAGE:
                return
            want(source)
            names = set()
            for alias in node.names:
                if module_file(root, f"{source}.{alias.name}") is not None:
                    want(f"{source}.{alias.name}")
                else:
                    names.add(alias.name)
            request(source, names if "*" not in names else None)

    followed: set[tuple[str, int]] = set()
    while todo:
        while todo:
            path, name = todo.pop()
            files.add(path.resolve().relative_to(root.resolve()))
            module = modules.get(name) or _Module(root, name, path)
            for node in module.imports:
                handle(node, name, module.is_package)
        for name, module in list(modules.items()):  # the lazy attributes some module asked for
            names = requested.get(name, set())
            for served, node in module.lazy:
                if names is None:
                    needed = True
                else:
                    asked = names - module.bound
                    needed = bool(asked) if served is None else bool(asked & served)
                if needed and (name, id(node)) not in followed:
                    followed.add((name, id(node)))
                    handle(node, name, module.is_package)
    return files
