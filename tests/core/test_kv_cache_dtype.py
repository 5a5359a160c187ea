"""The KV cache's dtype: fp32 on CPU by default, for bf16 models too (decode attention then
reads the cache in place and computes in fp32), the model's own on GPU, or as asked."""

from __future__ import annotations

import pytest
import torch

from titanserve import LLM, SamplingParams
from titanserve.core.engine_config import EngineConfig
from titanserve.core.errors import ConfigError
from titanserve.core.model.kv_cache import kv_cache_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    "name, device, model_dtype, expected",
    [
        ("auto", CPU, torch.bfloat16, torch.float32),
        ("auto", CPU, torch.float16, torch.float32),
        ("auto", CPU, torch.float32, torch.float32),
        ("auto", CUDA, torch.bfloat16, torch.bfloat16),
        ("bfloat16", CPU, torch.bfloat16, torch.bfloat16),
        ("float32", CUDA, torch.bfloat16, torch.float32),
    ],
)
def test_the_cache_dtype_follows_the_device_unless_named(name, device, model_dtype, expected):
    assert kv_cache_dtype(name, device, model_dtype) == expected


def test_an_unknown_cache_dtype_is_refused():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto, float32"):
        EngineConfig(model="m", kv_cache_dtype="int8")


def reference_logits(path, tokens: list[int]) -> torch.Tensor:
    """transformers in fp32 on the bf16-rounded weights: the bf16 model computed exactly."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
        return hf(torch.tensor([tokens])).logits[0]  # (T, V)


def test_a_bf16_model_on_cpu_attends_over_an_fp32_cache_in_place(tiny_model, random_prompts):
    """The default fp32 cache gives a bf16 model's decode the in-place path; its logits (prompt
    and generated) stay as close to the exact ones as with a bf16 cache."""
    path = tiny_model("llama")
    prompt = random_prompts([40], seed=3)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, return_logits=True)
    errors = {}
    for cache in ("auto", "bfloat16"):
        with LLM(str(path), dtype="bfloat16", kv_cache_dtype=cache, progress=False) as llm:
            runner = llm.engine.executor.runner
            fp32 = cache == "auto"
            assert runner.k_caches.dtype == (torch.float32 if fp32 else torch.bfloat16)
            assert runner.decode_in_place == fp32
            out = llm.generate([prompt], params)[0]
            prompt_logits = llm.prompt_logits([prompt])[0]
        exact = reference_logits(path, prompt + out.token_ids)  # (T + 8, V)
        generated = out.logits  # (8, V): the last prompt position's, then decodes
        errors[cache] = (
            (prompt_logits - exact[: len(prompt)]).abs().max().item(),
            (generated - exact[len(prompt) - 1 : -1]).abs().max().item(),
        )
    # bf16 weights and activations alike: ~1% of the largest logit (3.6) either way
    assert max(*errors["auto"], *errors["bfloat16"]) <= 0.08, errors
