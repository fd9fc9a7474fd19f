"""The import rules DESIGN.md states, read from the source: tp -> lowering -> qformats, inside tp
study -> model -> comm, and no two files that import each other."""
import ast
import itertools

from tests.conftest import ROOT

PACKAGES = ("qformats", "lowering", "tp")
KNOWN_CIRCLES: set = set()  # (none left)


def _module(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict:
    """{module: the project modules it imports, at module level or inside functions}."""
    raw = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            mod, found = _module(path), []
            package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found += [(a.name, ()) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        up = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    found.append((base, tuple(a.name for a in node.names)))
            raw[mod] = found
    out = {}
    for mod, found in raw.items():
        deps = set()
        for base, names in found:
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in raw]
            deps.update(subs if subs and len(subs) == len(names) else [base, *subs])
        out[mod] = {d for d in deps if d in raw and d != mod}
    return out


def _floor(module: str) -> int:
    """qformats 0, lowering 1, tp.comm 2, tp.model 3, tp.study 4; tp's faces (tp, tp.cli) on top."""
    for i, p in enumerate(("qformats", "lowering", "tp.comm", "tp.model", "tp.study")):
        if module == p or module.startswith(p + "."):
            return i
    return 5


def test_imports_flow_one_way():
    bad = [(m, d) for m, deps in _imports().items() for d in deps if _floor(d) > _floor(m)]
    assert not bad, f"imports that run back up: {bad}"


def test_no_two_files_import_each_other():
    imp = _imports()
    pairs = {frozenset({a, b}) for a, b in itertools.combinations(imp, 2) if b in imp[a] and a in imp[b]}
    assert pairs <= KNOWN_CIRCLES, sorted(map(sorted, pairs - KNOWN_CIRCLES))


MAX_LINES = 700  # issue 26's bound: a module longer than this holds more than one idea


def test_no_module_is_over_the_line_bound():
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their seams): {long}"
