"""Random-init models of real architectures' shapes, for speed comparisons (cached, seeded).

Decode and prefill speed depend on a model's shapes, not on its weight values, so a model of a
released architecture's shape with random weights measures what the trained one would, without
downloading it. Perplexity and KL of such a model mean nothing; builds pass ``--allow-untrained``.

Every model gets the default model's tokenizer (the only one available offline). Its 49,152 ids fit
every vocabulary below; ids the tokenizer never emits only pad the embedding, as in released models.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

RANDOM_SEED = 0

# name -> (transformers config class, its keyword arguments, where the shape comes from)
SHAPES: dict[str, tuple[str, dict[str, Any], str]] = {
    # issue 6's comparison model: hidden 2048, 10 layers, 16/4 heads, intermediate 8192. Its vocab there
    # is 32000, but the only tokenizer we have offline (the default model's) emits ids up to 49151 and
    # llama.cpp's converter rejects a tokenizer larger than the embedding, so the vocab is 49152 here;
    # the embedding is tied (as SmolLM2's), which keeps the count near 739M (709M).
    "llama-709m": (
        "LlamaConfig",
        {
            "vocab_size": None,  # the default model's
            "hidden_size": 2048,
            "num_hidden_layers": 10,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "intermediate_size": 8192,
            "tie_word_embeddings": True,
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
        },
        "issue 6",
    ),
    # Qwen2.5-0.5B's config.json (https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json):
    # 494M parameters (358M outside the tied 151936 x 896 table), 24 layers, 14 query / 2 KV heads of 64,
    # q/k/v biases, tied embedding. The vocabulary stays 151936: the table is a third of the model and
    # the lm_head's share of a decode step's reads.
    "qwen2.5-0.5b": (
        "Qwen2Config",
        {
            "vocab_size": 151936,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "hidden_act": "silu",
        },
        "huggingface.co/Qwen/Qwen2.5-0.5B config.json",
    ),
    # Llama-3.2-1B's config.json (https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json):
    # 1.24B parameters, 16 layers, 32 query / 8 KV heads of 64, tied 128256 x 2048 table, llama3 rope scaling.
    # Its int4 artifact (~0.8 GB) is larger than any cache, so decode speed is bound by memory.
    "llama3.2-1b": (
        "LlamaConfig",
        {
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3",
            },
            "tie_word_embeddings": True,
            "hidden_act": "silu",
        },
        "huggingface.co/meta-llama/Llama-3.2-1B config.json",
    ),
    # Granite 3.x 2B (ibm-granite/granite-3.3-2b-instruct config.json), vocab 49155 as issue 6 states it:
    # 2.53B parameters, 40 layers, 32 query / 8 KV heads of 64, tied 49155 x 2048 table, Granite's embedding /
    # residual / attention multipliers and logits scaling (benchmarks/scale_granite2b.py builds it at full size).
    # ``dtype``: made in bfloat16 as the checkpoint is (5.07 GB), which takes 5.5 GB of RAM instead of the 10 GB
    # of an fp32 model cast afterwards (the other rows are made in fp32 and cast: their weights stay as cached).
    "granite3-2b": (
        "GraniteConfig",
        {
            "vocab_size": 49155,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "tie_word_embeddings": True,
            "max_position_embeddings": 4096,
            "rope_theta": 10_000_000.0,
            "rms_norm_eps": 1e-5,
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.015625,
            "logits_scaling": 8.0,
            "dtype": "bfloat16",
        },
        "huggingface.co/ibm-granite/granite-3.3-2b-instruct config.json (vocab: issue 6)",
    ),
}


def random_model_dir(name: str, progress: Callable[[str], None]) -> Path:
    """The seeded random-init model ``name`` of :data:`SHAPES` (bf16 safetensors, cached under the
    edgepipe cache's ``models/``), with the default model's tokenizer files and special-token ids."""
    from edgepipe.models import cache_root, default_model_dir

    tok_src = default_model_dir(progress)
    folder = {"llama-709m": "random-llama-2048x10"}.get(name, f"random-{name}")  # the first one's old name
    out = cache_root() / "models" / f"{folder}-seed{RANDOM_SEED}"
    if (out / ".complete").is_file():
        return out
    import torch
    import transformers

    cls_name, shape, _source = SHAPES[name]
    progress(f"creating the random-init {name} in {out}")
    src_cfg = json.loads((tok_src / "config.json").read_text())
    cfg = getattr(transformers, cls_name)(
        **{**shape, "vocab_size": shape["vocab_size"] or src_cfg["vocab_size"]},
        bos_token_id=src_cfg.get("bos_token_id"),
        eos_token_id=src_cfg.get("eos_token_id"),
        pad_token_id=src_cfg.get("pad_token_id"),
    )
    torch.manual_seed(RANDOM_SEED)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # files of at most 5 GB, as checkpoints on the hub are (transformers 4's default): Granite 2B in two, as released
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    for f in tok_src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, tmp / f.name)
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
