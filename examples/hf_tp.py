"""A Hugging Face transformers model run with tensor parallelism (tp_plan), its o_proj and
down_proj all-reduces compressed by tp.hf_styles. Make a tiny model first (README), then

    torchrun --nproc-per-node 2 examples/hf_tp.py tiny-llama
"""
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, DistributedConfig
from tp.hf_styles import compressed_tp_plan

path = sys.argv[1]
plan = compressed_tp_plan(AutoConfig.from_pretrained(path), "mxfp8_e4m3")  # *.o_proj, *.down_proj
model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2, tp_plan=plan))
with torch.no_grad():
    print(model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1, :4])
