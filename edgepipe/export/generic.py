"""The generic export path: any ``...ForCausalLM`` transformers loads -> an fp32 ONNX decoder.

Used when the genai builder has no path for the architecture (GPT-2, GPT-J, GPT-NeoX, OPT, ...)
or the preflight says its fused kernels cannot run the shapes (a head size GroupQueryAttention
refuses, a projection it would take for the lm_head). torch.onnx's dynamo exporter traces a
wrapper whose inputs are ``input_ids``, ``attention_mask``, ``position_ids`` and the flat past
keys/values, and whose outputs are ``logits`` and the presents (past + new positions). The
legacy TorchScript exporter was tried and rejected: it bakes transformers 5's mask and cache
bookkeeping into constants (logits off by 0.2 on a tiny GPT-2), while dynamo's graph matches
PyTorch within 1e-6.

The graph then gets the builder's naming (:mod:`edgepipe.export.generic_graph`) and a
``genai_config.json`` that describes its I/O, with ``past_present_share_buffer: false`` so the
runtime grows the cache by concatenation. Every export is checked against PyTorch's logits
before it is handed on; the largest difference is recorded.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import StageError

logger = logging.getLogger(__name__)

EXPORTER = "torch.onnx (dynamo)"
MAX_ABS_DIFF = 1e-3  # fp32 export vs PyTorch logits: measured <= 1e-6 on the tiny models; above this the export is wrong
_TRACE_SEQ, _TRACE_PAST = 3, 2  # trace shapes: both dynamic, > 1 so the exporter keeps them symbolic
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def _wrapper(model: Any, num_layers: int) -> Any:
    import torch
    from transformers import DynamicCache

    class KVWrapper(torch.nn.Module):
        """Flat past tensors in, logits and flat presents out (ONNX has no Cache objects)."""

        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any]) -> tuple[Any, ...]:
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            layers = out.past_key_values.layers
            return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])

    return KVWrapper().eval()


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return int(kv), int(head)


def _names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{{}}.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(n.format("past_key_values") for n in kv)]
    return inputs, ["logits", *(n.format("present") for n in kv)]


def _inputs(config: Any, num_layers: int, seq: int, past: int, seed: int = 0) -> tuple[Any, ...]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    kv, head = _kv_shape(config)
    ids = torch.randint(0, int(config.vocab_size), (1, seq), generator=gen)
    mask = torch.ones(1, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None]
    cache = [torch.randn(1, kv, past, head, generator=gen) for _ in range(2 * num_layers)]
    return ids, mask, pos, cache


def _trace(wrapper: Any, config: Any, num_layers: int, path: Path) -> None:
    import torch
    from torch.export import Dim

    inputs, outputs = _names(num_layers)
    d = Dim.DYNAMIC
    shapes = ({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d}, [{0: d, 2: d} for _ in range(2 * num_layers)])
    try:
        torch.onnx.export(
            wrapper, _inputs(config, num_layers, _TRACE_SEQ, _TRACE_PAST), str(path), dynamo=True, dynamic_shapes=shapes,
            input_names=inputs, output_names=outputs, external_data=True, optimize=True, verbose=False,
        )
    except Exception as e:  # torch.export raises many untyped errors for code it cannot trace
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise StageError(f"the generic exporter cannot trace {type(wrapper.m).__name__}: {first}") from None


def write_genai_config(out_dir: Path, config: Any, num_layers: int) -> None:
    """The runtime's description of the graph (edgepipe.runtime.model.DecoderSpec reads it)."""
    kv, head = _kv_shape(config)
    eos = getattr(config, "eos_token_id", None)
    gen_cfg = getattr(config, "get_text_config", lambda: config)()
    genai = {
        "model": {
            "type": f"edgepipe-generic-{config.model_type}",
            "bos_token_id": getattr(config, "bos_token_id", None),
            "eos_token_id": eos if eos is not None else [],
            "pad_token_id": getattr(config, "pad_token_id", None),
            "vocab_size": int(config.vocab_size),
            "context_length": int(getattr(gen_cfg, "max_position_embeddings", 0) or getattr(gen_cfg, "n_positions", 2048)),
            "decoder": {
                "filename": "model.onnx", "num_hidden_layers": num_layers, "num_key_value_heads": kv, "head_size": head,
                "num_attention_heads": int(config.num_attention_heads), "hidden_size": int(config.hidden_size),
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"past_present_share_buffer": False, "max_length": 2048},
    }
    (out_dir / "genai_config.json").write_text(json.dumps(genai, indent=2), encoding="utf-8")


def _finish_graph(raw: Path, out_dir: Path) -> dict[str, int]:
    import onnx

    from edgepipe.export.generic_graph import normalize_weights

    model = onnx.load(str(raw), load_external_data=True)
    counts = normalize_weights(model)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return counts


def max_logit_diff(wrapper: Any, config: Any, num_layers: int, model_dir: Path) -> float:
    """Largest |ONNX - PyTorch| over the logits and presents of a prefill from an empty cache and a
    decode step after it: the two ways the runtime calls the graph."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst = 0.0
    for seq, past in ((7, 0), (1, 5)):
        args = _inputs(config, num_layers, seq, past, seed=1)
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(*args)]
        flat = [args[0], args[1], args[2], *args[3]]
        got = sess.run(None, dict(zip(names, (t.numpy() for t in flat), strict=True)))
        worst = max(worst, *(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True)))
    return worst


def _is_moe(model_dir: Path) -> bool:
    from edgepipe.export.preflight import preflight

    return preflight(model_dir).experts > 0


def export_generic(model_dir: Path, out_dir: Path, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export ``model_dir`` (any causal LM transformers loads) into ``out_dir``; return what ran."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"exporting fp32 ONNX with {EXPORTER} (generic path)")
    extra = {}
    if _is_moe(model_dir):
        # the default experts loop picks experts with nonzero() (a data-dependent shape torch.export
        # cannot trace); batched_mm gathers each token's experts' weights: one static graph
        extra["experts_implementation"] = "batched_mm"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager", **extra).eval()
    config = model.config
    num_layers = int(config.num_hidden_layers)
    wrapper = _wrapper(model, num_layers)
    raw_dir = out_dir.parent / (out_dir.name + "-raw")
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        _trace(wrapper, config, num_layers, raw_dir / "model.onnx")
        counts = _finish_graph(raw_dir / "model.onnx", out_dir)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    write_genai_config(out_dir, config, num_layers)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    diff = max_logit_diff(wrapper, config, num_layers, out_dir)
    if not diff <= MAX_ABS_DIFF:
        raise StageError(f"the generic export of {type(model).__name__} differs from PyTorch by {diff:.3g} (limit {MAX_ABS_DIFF}); "
                         "report it with the model's config.json")
    logger.info("generic export: %s, max |onnx - pytorch| = %.3g", counts, diff)
    return {"exporter": EXPORTER, "max_abs_diff_vs_pytorch": diff, "rewritten": counts}
