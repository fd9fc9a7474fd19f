"""README cannot rot: every script in examples/ runs, every README Python block is an excerpt
of one of them, and README's `python -m tp` / `torchrun -m tp` demo commands run as written
and compress something. Each runs in a fresh interpreter with a hard timeout."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT = 300  # seconds per script: the compile example compiles on 2 ranks (~30-60 s on 2 busy cores)

# the line each script prints when it checked what it shows
EXPECT = {
    "formats.py": "4.25 3.76",
    "all_reduce.py": "== emulate_all_reduce: True",
    "compile_tp_model.py": "compiled == eager tp.all_reduce: True",
    "fused_all_reduce.py": "fused mxfp4 all-reduce at TP=2",
}
NEEDS_GPUS = {"fused_all_reduce.py": 2}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)  # not under a launcher
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _norm(line: str) -> str:
    return " ".join(line.split())


def test_examples_are_known_and_named_in_readme():
    names = {p.name for p in EXAMPLES}
    assert names == set(EXPECT), names ^ set(EXPECT)
    for n in names:
        assert f"examples/{n}" in README, f"README does not mention examples/{n}"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    gpus = NEEDS_GPUS.get(script.name, 0)
    if gpus and torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    cmd = ["torchrun", f"--nproc-per-node={gpus}", str(script)] if gpus else [sys.executable, str(script)]
    assert EXPECT[script.name] in _run(cmd)


def test_readme_python_blocks_are_excerpts_of_examples():
    sources = {p.name: [_norm(l) for l in p.read_text().splitlines() if l.strip()] for p in EXAMPLES}
    blocks = _blocks("python")
    assert len(blocks) >= 3
    for block in blocks:
        want = [_norm(l) for l in block.splitlines() if l.strip()]

        def contains(lines):  # the block's lines, in order, within the script
            it = iter(lines)
            return all(any(w == l for l in it) for w in want)

        assert any(contains(lines) for lines in sources.values()), f"README block is in no example:\n{block}"


def _demo_commands() -> list[str]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"^(python -m tp|torchrun .*-m tp) ", line):
                cmds.append(line)
    return cmds


def test_readme_has_demo_commands():
    assert len(_demo_commands()) >= 2


@pytest.mark.parametrize("command", _demo_commands())
def test_readme_demo_command_compresses(command):
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    else:  # torchrun: the same Python's launcher
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    out = _run(argv)
    m = re.search(r"all-reduces compressed: (\d+) of (\d+)", out)
    assert m and int(m.group(1)) > 0, out
    assert "time to first token" in out
