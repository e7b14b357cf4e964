"""Import cycles in src/blockdraft: between modules, and between its folders (sub-packages).

Every import counts, also those inside functions (a lazy import hides a cycle from Python,
not from the reader); imports under `if TYPE_CHECKING:` do not (they are types only).
Exit 1 and list the cycles if there is any.

    python scripts/check_imports.py
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "blockdraft"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that the file at `path` imports."""
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name`, the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def folder_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Imports between the package's folders (blockdraft.refine, blockdraft.train, ...)."""
    folder = lambda m: ".".join(m.split(".")[:2]) if (PACKAGE / m.split(".")[1]).is_dir() else None  # noqa: E731
    out: dict[str, set[str]] = {}
    for source, targets in edges.items():
        a = folder(source) if "." in source else None
        if a:
            out.setdefault(a, set()).update(b for t in targets if "." in t and (b := folder(t)) and b != a)
    return out


def main() -> int:
    edges = graph()
    found = [("modules", c) for c in cycles(edges)]
    found += [("folders", c) for c in cycles(folder_graph(edges))]
    for kind, cycle in found:
        print(f"import cycle between {kind}: {' <-> '.join(cycle)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
