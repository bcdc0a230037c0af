"""The package's modules import one another one way (issue 20: no import circles). A
circle makes the import order matter (a name read before its module finished loading),
and it is how a registry "filled at import" creeps back in. The graph is read from the
sources, function-level imports included, so a lazy import cannot hide a circle."""

import ast
from pathlib import Path

import diffkern

PKG = Path(diffkern.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, files) -> set[str]:
    """The modules of the package that the file imports ("from . import x" imports module
    x, "from .m import f" module m)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out.update(c for c in cands if c.split(".")[0] == "diffkern")
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in _imports(path, name, files):
            while target and target not in files:
                target = target.rpartition(".")[0]
            # a module importing its own package (diffkern.info importing diffkern) reaches
            # __init__, which is the public face, not a layer: not an edge of the stack
            if target and target != name and target != "diffkern":
                deps.add(target)
        graph[name] = deps
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_reader_sees_edges():
    """A reader that found no edges would pass any package."""
    g = _graph()
    assert "diffkern._validate" in g["diffkern.sampler_ops"]
    assert "diffkern.unchecked" in g["diffkern.sampler_ops"]
    assert "diffkern._native_samplers" in g["diffkern.unchecked"]
    assert "diffkern._reference_common" in g["diffkern.reference_samplers"]
    assert "diffkern.integrations.diffusers._base" in g["diffkern.integrations.diffusers.ddim"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)
