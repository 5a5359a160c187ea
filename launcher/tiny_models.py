"""Tiny random Hugging Face checkpoints of every supported family (the test oracle's zoo).

`make_tiny(family, out_dir)` builds the model with transformers (needed for this command
only), saves it with `save_pretrained`, and adds a real byte-level BPE tokenizer trained
with `tokenizers` on a small built-in corpus, with a ChatML chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Mixture-of-experts models route every token to a few experts.",
    "Long contexts are split across workers with ring attention.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Héllo wörld — naïve café, 東京, 😀 emoji and tabs\tand  spaces.",
]

# family -> (architecture, config overrides)
_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            )
        ),
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        dict(
            head_dim=24,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=256,
            ),
        ),
    ),
    "mixtral": (
        "MixtralForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=8,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            **_MOE,
        ),
    ),
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], **_MOE
        ),
    ),
}


def build_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """A small, real byte-level BPE tokenizer (deterministic for a given corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random checkpoint of `family` (see FAMILIES) to out_dir."""
    if family.startswith("tiny-"):
        family = family[len("tiny-") :]
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    arch, extra = FAMILIES[family]
    kwargs = {**_BASE, **extra, **overrides, "vocab_size": vocab}
    im_end = tok.token_to_id("<|im_end|>")
    eos = tok.token_to_id("<|endoftext|>")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(bos_token_id=None, eos_token_id=[eos, im_end], pad_token_id=None, **kwargs)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": CHATML_TEMPLATE,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 1024,
            },
            indent=2,
        )
    )
    return out
