"""Sentence-embedding encoder (BERT family, sentence-transformers folder) -> one static fp32 graph.

:func:`read_spec` reads the folder: ``config.json``, ``tokenizer.json`` and the sentence-transformers
``modules.json`` / pooling config, so the ONNX graph computes the same embedding as
``SentenceTransformer.encode`` (mean or CLS pooling, optional L2 norm). :func:`export_encoder`
exports it with a *static* shape (batch 1, ``seq_len`` tokens) with torch.onnx: the HTP compiles
fixed shapes only. The attention mask is turned into an additive bias of ``MASK_BIAS`` inside the
graph instead of transformers' ``finfo.min``: the quantizer gives the "scores + mask" tensor one
scale, and a range reaching -3.4e38 would leave no resolution for the scores themselves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edgepipe.errors import ModelError, cannot_read

MASK_BIAS = -100.0  # exp(-100) ~ 4e-44: masked keys get no weight, and the range stays small
OPSET = 20  # Gelu is an ONNX op from opset 20 on
MAX_EXPORT_REL_DIFF = 1e-3  # the export vs PyTorch, over the embedding's largest entry
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
# besides config, weights and tokenizer: the sentence-transformers files that change the embedding
ST_FILES = ("modules.json", "sentence_bert_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What the folder says about how to compute one sentence embedding."""

    model_dir: Path
    model_type: str
    hidden_size: int
    pooling: str  # "mean" or "cls"
    normalize: bool
    max_seq_length: int
    uses_token_type_ids: bool


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(cannot_read("model file", path, e)) from None
    except ValueError as e:
        raise ModelError(f"cannot read {path}: {e}; fix or re-save the model folder") from None


def _pooling(model_dir: Path, module: dict[str, Any]) -> str | None:
    """``mean`` or ``cls`` from a Pooling module's config (None when it has none)."""
    pcfg_path = model_dir / module.get("path", "") / "config.json"
    if not pcfg_path.is_file():
        return None
    modes = [k for k, v in _read_json(pcfg_path).items() if k.startswith("pooling_mode_") and v]
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise ModelError(f"{pcfg_path}: pooling {modes} is not supported (mean or cls only)")


def _modules(model_dir: Path) -> tuple[str, bool]:
    """(pooling, normalize) from ``modules.json``; a plain HF folder (none) gets mean pooling and
    L2 normalisation, the sentence-transformers default for such models."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return "mean", True
    pooling, normalize = "mean", False
    for m in _read_json(modules_path):
        kind = str(m.get("type", ""))
        if kind.endswith(".Pooling"):
            pooling = _pooling(model_dir, m) or pooling
        elif kind.endswith(".Normalize"):
            normalize = True
        elif not kind.endswith(".Transformer"):
            raise ModelError(f"{modules_path}: module {m.get('type')} is not supported on the NPU path")
    return pooling, normalize


def read_spec(model_dir: Path) -> EncoderSpec:
    """Read ``config.json`` and the sentence-transformers modules of ``model_dir``."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} has no config.json; point --model at a Hugging Face model folder")
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json; save the tokenizer with the model (fast tokenizer)")
    cfg = _read_json(cfg_path)
    model_type = str(cfg.get("model_type", ""))
    if model_type not in ENCODER_TYPES:
        raise ModelError(
            f"{model_dir}: model_type {model_type!r} is not a supported encoder for the NPU path "
            f"({', '.join(ENCODER_TYPES)})"
        )
    pooling, normalize = _modules(model_dir)
    max_len = int(cfg.get("max_position_embeddings", 512))
    st_cfg = model_dir / "sentence_bert_config.json"
    if (model_dir / "modules.json").is_file() and st_cfg.is_file():
        max_len = int(_read_json(st_cfg).get("max_seq_length", max_len))
    return EncoderSpec(
        model_dir=model_dir,
        model_type=model_type,
        hidden_size=int(cfg.get("hidden_size", cfg.get("dim", 0))),
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_len,
        uses_token_type_ids=int(cfg.get("type_vocab_size", 0) or 0) > 0,
    )


def source_sha256(model_dir: Path) -> str:
    """The content hash that keys the export: config, weights, tokenizer and sentence-transformers
    files. (``edgepipe.export.inspect_model`` checks decoder configs, which encoders such as
    DistilBERT's do not follow.)"""
    from edgepipe.export.inspect import hash_files

    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise ModelError(f"{model_dir} has no *.safetensors (or *.bin) weights; pass a complete model folder")
    extra = sorted(model_dir.glob("*/config.json"))  # the Pooling module's config
    names = ("config.json", *TOKENIZER_FILES, *ST_FILES)
    return hash_files([model_dir / n for n in names if (model_dir / n).is_file()] + weights + extra)


def _load(model_dir: Path) -> Any:
    """The transformers encoder, refusing a checkpoint it would complete at random (a missing or
    mis-shaped tensor; the unused pooler head excepted). Unexpected tensors (a task head) are dropped."""
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(model_dir, attn_implementation="eager", output_loading_info=True)
    except Exception as e:
        if "ignore_mismatched_sizes" in str(e):  # transformers refuses a mis-shaped tensor itself (its report goes to the log)
            raise ModelError(f"a tensor in {model_dir} has a shape other than config.json implies (transformers refused to load it); "
                             "the config does not belong to these weights") from None
        raise ModelError(f"cannot load {model_dir} with transformers: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
    missing = [k for k in info.get("missing_keys", []) if not str(k).startswith("pooler.")]
    for kind, keys in (("missing", missing), ("mis-shaped", info.get("mismatched_keys", []))):
        if keys:
            raise ModelError(f"transformers reports {kind} tensors loading {model_dir}, e.g. {str(list(keys)[0])!r}; "
                             "it would initialise them at random: pass the complete checkpoint")
    return model.eval()


def _crosscheck(wrapper: Any, onnx_path: Path, seq_len: int, vocab_size: int) -> dict[str, Any]:
    """The exported graph against PyTorch on two fixed inputs (one padded): fp32 vs fp32, only
    kernel rounding may differ."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for pad in (0, seq_len // 3):
        ids = (np.arange(seq_len, dtype=np.int64) * 7919 + 101) % max(vocab_size, 1)
        mask = np.ones(seq_len, dtype=np.int64)
        mask[seq_len - pad:] = 0
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(ids[None]), torch.from_numpy(mask[None])).numpy().astype(np.float64)
        got = sess.run(None, {"input_ids": ids[None], "attention_mask": mask[None]})[0].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(ref - got))) / max(float(np.max(np.abs(ref))), 1e-12))
    if not worst <= MAX_EXPORT_REL_DIFF:
        raise ModelError(f"the fp32 encoder export does not compute what PyTorch does (max difference {worst:.3g} of the "
                         "embedding's range): this encoder variant is not supported on the NPU path")
    return {"inputs": 2, "max_relative_diff": worst}


def export_encoder(spec: EncoderSpec, seq_len: int, out: Path) -> dict[str, Any]:
    """Export the encoder + pooling + normalisation as a static-shape fp32 ONNX graph; return the
    record of its cross-check against PyTorch."""
    import torch

    model = _load(spec.model_dir)

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask)[:, None, None, :] * MASK_BIAS  # 4D masks are used as given
            kwargs = {"input_ids": input_ids, "attention_mask": bias}
            if spec.uses_token_type_ids:
                kwargs["token_type_ids"] = torch.zeros_like(input_ids)
            hidden = self.inner(**kwargs).last_hidden_state
            if spec.pooling == "cls":
                emb = hidden[:, 0]
            else:
                summed = (hidden * mask.unsqueeze(-1)).sum(1)
                emb = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
            if spec.normalize:
                emb = torch.nn.functional.normalize(emb, p=2.0, dim=1)
            return emb

    wrapper = SentenceEncoder(model).eval()
    # distinct example tensors: the exporter merges inputs that are the same object
    ids = torch.full((1, seq_len), 5, dtype=torch.long)
    am = torch.ones((1, seq_len), dtype=torch.long)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, am),
            str(out),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            external_data=False,
        )
    return _crosscheck(wrapper, out, seq_len, int(getattr(model.config, "vocab_size", 0) or 0))
