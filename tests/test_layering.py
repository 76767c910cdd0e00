"""Layering of the package: no import cycle between its parts (model, train, tokenizer, convert, cli, ...) nor between
any two modules, and every package-internal import at module top (so the import graph read here is the one Python
runs, and no cycle hides inside a function). How: parse every module with `ast`, collect its imports of
`infinitystar.*` (at any depth), and look for strongly connected components of the graph. A package import
inside a function is only allowed where it is guarded by `except ImportError` (the module needs an optional
dependency)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "infinitystar"


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def type_checking_only(tree: ast.AST) -> set[int]:
    """Import statements under `if TYPE_CHECKING:` (annotations only: never run)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and (getattr(node.test, "id", None) or getattr(node.test, "attr", None)) == "TYPE_CHECKING"
            for stmt in node.body for n in ast.walk(stmt)}


def imports(tree: ast.AST, known: dict[str, Path]) -> list[tuple[ast.stmt, str]]:
    """(statement, imported module of the package) for every import in the tree that runs."""
    found = {}
    skip = type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for n in names:
            while n not in known and "." in n:
                n = n.rsplit(".", 1)[0]
            if n in known:
                found[id(node), n] = (node, n)
    return list(found.values())


def module_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, f in known.items():
        if name.endswith("__main__"):   # entry points: nothing imports them
            continue
        deps = {n for _, n in imports(ast.parse(f.read_text()), known)}
        # `from infinitystar.train import trainer` names the package too: a package is not a dependency of its modules
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def part(module: str) -> str:
    """The package part a module belongs to: a subpackage, or a top-level module (`checkpoint_io`, `runtime`, ...)."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_parts_of_the_package():
    parts: dict[str, set[str]] = {}
    for m, deps in module_graph().items():
        parts.setdefault(part(m), set()).update(part(d) for d in deps if part(d) != part(m))
    assert cycles(parts) == []


def test_no_import_cycle_between_modules():
    assert cycles(module_graph()) == []


def optional_imports(tree: ast.AST) -> set[int]:
    """Import statements guarded by `except ImportError` (a module that needs an optional dependency)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)
                        if isinstance(n, (ast.Import, ast.ImportFrom))}
    return guarded


def test_package_imports_sit_at_module_top():
    known = modules()
    hidden = []
    for name, f in known.items():
        tree = ast.parse(f.read_text())
        allowed = {id(n) for n in tree.body} | optional_imports(tree)
        hidden += [f"{f.relative_to(SRC)}:{node.lineno} imports {dep}" for node, dep in imports(tree, known)
                   if id(node) not in allowed]
    assert hidden == []
