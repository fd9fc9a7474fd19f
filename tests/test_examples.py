"""README cannot rot: every script in examples/ runs, every README Python block is an excerpt
of one of them, and README's `python -m tp` / `torchrun -m tp` demo commands run as written
and compress something. Each runs in a fresh interpreter with a hard timeout."""
from __future__ import annotations

import os
import re
import shlex
import signal
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
    "dtensor_mlp.py": "True",
    "hf_tp.py": "tensor([",
    "vllm_offline.py": "all-reduces compressed",
}
NEEDS_GPUS = {"fused_all_reduce.py": 2}
TORCHRUN = {"dtensor_mlp.py": 2, "hf_tp.py": 2}  # CPU ranks under torchrun (gloo)
ARGS = {"hf_tp.py": ["tiny-llama"], "vllm_offline.py": ["tiny-llama"]}
NEEDS_MODULE = {"vllm_offline.py": "vllm"}  # run by README's test command in its vLLM venv  # made by README's `python -c ...` line before it runs


def _env(cpu_ranks: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # not under a launcher (torchrun sets its own)
    if cpu_ranks:
        # CPU ranks under torchrun, as README documents them (gloo): on a GPU machine the ranks
        # must not pick CUDA up (two ranks cannot share one GPU, and the GPU paths bind devices)
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(cmd: list[str], cwd: Path = ROOT, cpu_ranks: bool = False) -> str:
    """Run ``cmd`` in its own session; on timeout kill the whole session (torchrun's ranks too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(cpu_ranks), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} did not finish in {TIMEOUT} s:\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _norm(line: str) -> str:
    return " ".join(line.split())


def test_readme_grammar_is_the_spec_grammar():
    """The format grammar is stated twice (qformats.spec's docstring, README): the first lines and
    the options must agree, and every example README gives must parse to the preset it names."""
    import qformats
    from qformats import spec

    block = re.search(r"^```\n(ELEMENT / BLOCK / SCALE .*?)```", README, re.S | re.M)[1]
    head = re.search(r"^\s*(ELEMENT / BLOCK / SCALE .*)$", spec.__doc__, re.M)[1]
    assert block.splitlines()[0] == head
    options = re.findall(r"^\s*(\+\w+(?:\{N\}|\[\.\.\.\])?)\s", spec.__doc__, re.M)
    assert options and all(re.search(rf"^{re.escape(o)}\s", block, re.M) for o in options), options
    for text, name in re.findall(r"^(\S+)\s+= (\w+)", block, re.M):
        assert qformats.Format.parse(text) == qformats.Format.parse(name), (text, name)


def test_examples_are_known_and_named_in_readme():
    names = {p.name for p in EXAMPLES}
    assert names == set(EXPECT), names ^ set(EXPECT)
    for n in names:
        assert f"examples/{n}" in README, f"README does not mention examples/{n}"


def _setup_command(name: str) -> list[str]:
    """README's `python -c ...` line that makes what an example's argument names."""
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.startswith("python -c ") and ARGS[name][0] in line:
                return [sys.executable] + shlex.split(line)[1:]
    raise AssertionError(f"README has no `python -c` line that makes {ARGS[name][0]}")


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    name = script.name
    gpus = NEEDS_GPUS.get(name, 0)
    if gpus and torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    if name in NEEDS_MODULE:
        pytest.importorskip(NEEDS_MODULE[name])
    ranks = gpus or TORCHRUN.get(name, 0)
    cmd = (_torchrun(ranks) if ranks else [sys.executable]) + [str(script)] + ARGS.get(name, [])
    if name in ARGS:
        _run(_setup_command(name), cwd=tmp_path)
    assert EXPECT[name] in _run(cmd, cwd=tmp_path, cpu_ranks=not gpus and bool(ranks))


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
    else:  # torchrun: the same Python's launcher, CPU ranks (gloo) as README says
        argv = _torchrun(1)[:3] + argv[1:]
    out = _run(argv, cpu_ranks=argv[1:3] == ["-m", "torch.distributed.run"])
    m = re.search(r"all-reduces compressed: (\d+) of (\d+)", out)
    assert m and int(m.group(1)) > 0, out
    assert "time to first token" in out
