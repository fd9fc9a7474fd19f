"""The ``qformats`` command as a new user meets it: ``--help``, ``formats`` and ``inspect`` import
the formats alone (not the TP runtime, Triton, torch.compile or transformers), help texts are
plain text, preset names forgive case and typos, and ``inspect`` knows every name eval takes."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# What a listing of formats must not pay for (seconds of imports on a busy machine).
HEAVY = ("torch._dynamo", "torch._inductor", "triton", "lowering", "tp.comm", "tp.model", "tp.study.eval",
         "transformers", "matplotlib", "sympy")


def _modules_after(argv: list) -> tuple[set, str]:
    """The modules a fresh interpreter holds after ``qformats ARGV``, and what it printed."""
    code = (
        "import sys, contextlib, io, json\n"
        "from tp.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        f"        rc = main({argv!r})\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        "assert rc in (0, None), rc\n"
        "print(json.dumps([sorted(sys.modules), buf.getvalue()]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    mods, out = json.loads(proc.stdout.splitlines()[-1])
    return set(mods), out


@pytest.mark.parametrize("argv", [["--help"], ["formats"], ["inspect", "mxfp4"], ["inspect", "outlier_int4_dyn"]])
def test_light_commands_import_no_heavy_module(argv):
    mods, out = _modules_after(argv)
    heavy = sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not heavy, f"qformats {' '.join(argv)} imported {heavy[:20]} ({len(heavy)} heavy modules)"
    tp_mods = sorted(m for m in mods if m.split(".")[0] == "tp")
    assert set(tp_mods) <= {"tp", "tp.cli", "tp.study", "tp.study.names"}, tp_mods  # none of the runtime
    assert out.strip()
    if argv == ["--help"]:
        assert "torch" not in mods  # the help needs no torch at all


def test_eval_and_tune_help_are_plain_text():
    for cmd in ("eval", "tune"):
        _, out = _modules_after([cmd, "--help"])
        for markup in (":func:", ":class:", ":mod:", ":attr:", ":meth:", "``"):
            assert markup not in out, (cmd, markup)
        description = out.split("options:")[0].strip()
        assert description.endswith((".", ")")), (cmd, description[-200:])  # ends with a whole sentence
    _, top = _modules_after(["--help"])
    assert "``" not in top and ":func:" not in top


def test_preset_names_forgive_case_and_suggest():
    import qformats

    assert qformats.Format.parse("MXFP4") == qformats.PRESETS["mxfp4"] == qformats.as_format(" Mxfp4 ")
    assert qformats.Format.parse("NVFP4") == qformats.PRESETS["nvfp4"]
    with pytest.raises(ValueError, match="did you mean mxfp4"):
        qformats.Format.parse("mxfp44")


def test_inspect_knows_every_eval_name(capsys):
    from tp.cli import main
    from tp.study import names

    for name in ["bf16", *names.OUTLIER_FORMATS, "outlier:int4/b32/bf16", "MXFP4", "nvfp4"]:
        assert main(["inspect", name]) == 0, name
        assert capsys.readouterr().out.strip()
    assert main(["inspect", "outlier_int5"]) == 2
    assert "did you mean outlier_int4" in capsys.readouterr().err


def test_eval_format_typo_lists_the_names_once(capsys, tmp_path):
    from tp.cli import main

    assert main(["eval", "--formats", "mxfp44", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "did you mean mxfp4" in err
    assert err.count("nvfp4") == 1, err  # the preset list once, not twice
    assert not (tmp_path / "o").exists()


def test_argument_errors_come_before_the_writing_to_line(capsys, tmp_path):
    from tp.cli import main

    assert main(["eval", "--tokens", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "writing to" not in err


def test_tune_argument_errors_come_before_the_writing_to_line(capsys, tmp_path):
    from tp.cli import main

    assert main(["tune", "--tokens", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "writing to" not in err
    assert not (tmp_path / "o").exists()


def test_progress_labels_name_the_command_and_stage(tmp_path, monkeypatch, capsys):
    """qformats eval's bar says `qformats eval`; each of tune's stages says `qformats tune i/3 <stage>`."""
    pytest.importorskip("transformers")
    from tests.tp.study.test_eval import WordTokenizer, synthetic_text, tiny_llama
    from tp.study import assets
    from tp.study import eval as ev
    from tp.study.tune import run_tune

    text = assets.TextData(synthetic_text(seed=1), synthetic_text(seed=2), "synthetic")
    ev.run_eval(model=tiny_llama(layers=2), tokenizer=WordTokenizer(), text=text, formats=["mxfp4"], tp=[2],
                tokens=48, window=48, progress=True)
    assert "qformats eval:" in capsys.readouterr().err
    labels, real = [], ev.run_eval
    monkeypatch.setattr(ev, "run_eval", lambda *a, **k: labels.append(k.get("label")) or real(*a, **k))
    run_tune(tiny_llama(layers=2), text, tokenizer=WordTokenizer(), progress=True, tp=2, candidates=["mxfp4"],
             budgets=[9], confirm_tokens=96, confirm_budgets=[9], tokens=48, window=48, out=tmp_path)
    assert labels == ["qformats tune 1/3 sensitivity", "qformats tune 2/3 joint", "qformats tune 3/3 confirm"]
    err = capsys.readouterr().err
    assert "qformats tune 1/3 sensitivity:" in err and "qformats eval:" not in err
