"""Sparse upcycling Llama -> Mixtral, checked with transformers: identical experts and
renormalised top-k routing must give the dense model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from titanserve.core import upcycle
from titanserve.core.gguf_convert import cached_checkpoint_for_gguf, find_smollm2_gguf
from titanserve.core.upcycle import upcycle_to_moe


def tiny_llama_dir(folder, tie_word_embeddings=False):
    """A random 2-layer Llama checkpoint folder (fp32) and the model it holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=5000.0, tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    return model


def load_mixtral(folder):
    from transformers import MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits  # (B, S, V)


IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))  # (B, S)


@pytest.mark.parametrize("tie", [False, True])
def test_upcycled_logits_equal_dense(tmp_path, tie):
    dense = tiny_llama_dir(tmp_path / "dense", tie_word_embeddings=tie)
    out = upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2)
    moe = load_mixtral(out)
    assert moe.config.tie_word_embeddings is tie
    assert (logits(moe, IDS) - logits(dense, IDS)).abs().max().item() <= 1e-4


def test_upcycled_checkpoint_layout(tmp_path):
    dense = tiny_llama_dir(tmp_path / "dense")
    out = upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", num_experts=3, top_k=1, seed=7)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3, 1)
    assert (config["head_dim"], config["rope_theta"]) == (16, 5000.0)
    assert config["sliding_window"] is None
    assert (out / "tokenizer_config.json").read_text() == '{"chat_template": "{{ messages }}"}'
    tensors = load_file(out / "model.safetensors")
    state = dense.state_dict()
    for layer in range(2):
        moe = f"model.layers.{layer}.block_sparse_moe"
        mlp = f"model.layers.{layer}.mlp"
        assert tensors[f"{moe}.gate.weight"].shape == (3, 64)  # (E, H)
        for e in range(3):
            for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                assert torch.equal(tensors[f"{moe}.experts.{e}.{w}.weight"],
                                   state[f"{mlp}.{proj}.weight"])
        assert not any(name.startswith(f"{mlp}.") for name in tensors)
    again = upcycle_to_moe(tmp_path / "dense", tmp_path / "again", num_experts=3, top_k=1, seed=7)
    other = upcycle_to_moe(tmp_path / "dense", tmp_path / "other", num_experts=3, top_k=1, seed=8)
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(load_file(again / "model.safetensors")[router], tensors[router])
    assert not torch.equal(load_file(other / "model.safetensors")[router], tensors[router])


def test_noise_makes_experts_differ(tmp_path):
    dense = tiny_llama_dir(tmp_path / "dense")
    out = upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, noise=0.1)
    tensors = load_file(out / "model.safetensors")
    w1 = [tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)]
    base = dense.state_dict()["model.layers.0.mlp.gate_proj.weight"]
    relative = (w1[0] - base).std() / base.std()
    assert 0.05 < relative.item() < 0.2
    assert not torch.equal(w1[0], w1[1])
    diff = (logits(load_mixtral(out), IDS) - logits(dense, IDS)).abs().max().item()
    assert diff > 1e-3
    again = upcycle_to_moe(tmp_path / "dense", tmp_path / "again", 4, 2, noise=0.1)
    assert torch.equal(load_file(again / "model.safetensors")[
        "model.layers.0.block_sparse_moe.experts.0.w1.weight"], w1[0])


def test_shards_past_the_size_limit(tmp_path, monkeypatch):
    dense = tiny_llama_dir(tmp_path / "dense")
    monkeypatch.setattr(upcycle, "MAX_SHARD_BYTES", 200_000)
    out = upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert (logits(load_mixtral(out), IDS) - logits(dense, IDS)).abs().max().item() <= 1e-4


def test_errors(tmp_path):
    tiny_llama_dir(tmp_path / "dense")
    with pytest.raises(ValueError, match="top_k"):
        upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="noise"):
        upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", noise=-1.0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        upcycle_to_moe(tmp_path / "nowhere", tmp_path / "moe")
    upcycle_to_moe(tmp_path / "dense", tmp_path / "moe", num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="can only upcycle Llama"):
        upcycle_to_moe(tmp_path / "moe", tmp_path / "moe2")


@pytest.mark.slow
def test_smollm2_upcycled_logits_equal_dense(tmp_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    cache = tmp_path_factory.getbasetemp() / "gguf-cache"  # shared with test_gguf_smollm2.py
    dense_dir = cached_checkpoint_for_gguf(find_smollm2_gguf(), dtype="float32", cache_dir=cache)
    out = upcycle_to_moe(dense_dir, tmp_path / "moe", num_experts=4, top_k=2)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 198, 6004, 1217, 314, 253, 3575, 30, 2]])  # (1, S)
    assert (logits(load_mixtral(out), ids) - logits(dense, ids)).abs().max().item() <= 1e-4
