"""Hugging Face models as an optional extra (`pip install fsdp_nb[hf]`): built from a config, no download."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(120)

SETUP = """
import warnings
warnings.filterwarnings("ignore")
from torch.distributed.fsdp import FSDPModule
from transformers import LlamaConfig, LlamaForCausalLM
from fsdp_nb import FSDPConfig, shard
cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
llama = LlamaForCausalLM(cfg)
ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
ref_loss = llama(input_ids=ids, labels=ids).loss.item()
model = shard(llama, FSDPConfig(fsdp_version={version}, auto_wrap_policy="TRANSFORMER_BASED_WRAP"))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
"""


@pytest.mark.parametrize("version", [1, 2])
def test_tiny_llama_wraps_its_no_split_modules_and_matches_unsharded(session, version):
    session.run(SETUP.format(version=version)).raise_errors()
    if version == 2:
        units = session.eval(
            "sorted(type(m).__name__.removeprefix('FSDP') for m in model.modules() if isinstance(m, FSDPModule))"
        )
        assert units[0] == ["LlamaDecoderLayer", "LlamaDecoderLayer", "LlamaForCausalLM"]
    else:
        units = session.eval(
            "sorted(type(m.module).__name__ for m in model.modules() if type(m).__name__ == 'FullyShardedDataParallel')"
        )
        assert units[0] == ["LlamaDecoderLayer", "LlamaDecoderLayer", "LlamaForCausalLM"]
    losses = session.eval("(loss.item(), ref_loss)")
    for got, ref in losses:
        assert abs(got - ref) < 1e-5
