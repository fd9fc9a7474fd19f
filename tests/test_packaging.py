"""pyproject's dependency ranges: one range per dependency, the same in every extra that names
it, and transformers' range the one tp.hf_styles supports (README's quick start installs
``.[eval]`` and then runs the transformers example)."""
import ast
import re

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)", req)
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    return name, m.group(2).split(";")[0].replace(" ", "")


def _hf_styles_range() -> str:
    """SUPPORTED_TRANSFORMERS of tp/hf_styles.py, read from the source (importing it needs transformers)."""
    consts = {}
    for node in ast.parse((ROOT / "tp" / "hf_styles.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            consts[node.targets[0].id] = node.value.value
    return f">={consts['MIN_TRANSFORMERS']},<{consts['FIRST_UNTESTED_TRANSFORMERS']}"


def _all_requirements() -> dict:
    """{dependency: {where: specifier}} over the core dependencies and every extra."""
    proj = _project()
    seen: dict = {}
    groups = {"dependencies": proj.get("dependencies", []), **proj.get("optional-dependencies", {})}
    for where, reqs in groups.items():
        for req in reqs:
            name, spec = _split(req)
            if name == "qformats":  # an extra that pulls in another extra
                continue
            seen.setdefault(name, {})[where] = spec
    return seen


def test_one_range_per_dependency():
    differ = {name: where for name, where in _all_requirements().items() if len(set(where.values())) > 1}
    assert not differ, f"a dependency with different ranges in different extras: {differ}"


def test_transformers_range_is_what_hf_styles_supports():
    where = _all_requirements().get("transformers", {})
    assert "eval" in where, "README's quick start (.[eval]) runs the transformers example: [eval] needs transformers"
    supported = _hf_styles_range()
    assert where and all(spec == supported for spec in where.values()), (where, supported)


def test_split_reads_names_and_ranges():
    assert _split("transformers>=5.16,<5.25") == ("transformers", ">=5.16,<5.25")
    assert _split("ml_dtypes >= 0.5") == ("ml-dtypes", ">=0.5")
    assert _split("torch") == ("torch", "")
