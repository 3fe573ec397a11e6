"""Run a sentence-embedding artifact (the Hexagon NPU encoder path) with onnxruntime alone.

The build (``edgepipe.npu.encoder``) ships one static graph of ``seq_len`` tokens: a QDQ model (any
HTP generation, or onnxruntime's CPU execution provider) and, when the graph runs wholly on the
NPU, an EPContext model with its QNN context binary for the target's HTP. ``npu_config.json``
names them. Tokenization pads and truncates to exactly ``seq_len`` because the graph is static.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ArtifactError, InputError
from edgepipe.runtime.kinds import NPU_CONFIG as CONFIG_FILE
from edgepipe.runtime.threads import intra_op_threads


def load_tokenizer(model_dir: Path, seq_len: int) -> Any:
    """The folder's fast tokenizer, truncating and padding to exactly ``seq_len`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.enable_truncation(seq_len)
    pad_id, pad_token = 0, "[PAD]"
    for candidate in ("[PAD]", "<pad>"):
        tid = tok.token_to_id(candidate)
        if tid is not None:
            pad_id, pad_token = tid, candidate
            break
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad_token)
    return tok


def encode(tok: Any, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Tokenize to the graph's feeds: one batch-1 dict per text (the graph is static)."""
    feeds = []
    for e in tok.encode_batch(texts):
        feeds.append(
            {
                "input_ids": np.asarray([e.ids], dtype=np.int64),
                "attention_mask": np.asarray([e.attention_mask], dtype=np.int64),
            }
        )
    return feeds


class SentenceEncoder:
    """``embed(texts) -> [n, hidden]`` on the HTP when onnxruntime-qnn is installed (the context
    binary, CPU fallback off), else the QDQ graph on the CPU execution provider."""

    def __init__(self, artifact: Path | str, *, threads: int = 0) -> None:
        self.dir = Path(artifact)
        path = self.dir / CONFIG_FILE
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            self.seq_len = int(cfg["seq_len"])
            self.htp_arch = int(cfg["htp_arch"])
            self.soc_model = None if cfg.get("soc_model") is None else int(cfg["soc_model"])
            files = dict(cfg["files"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} is missing or malformed ({type(e).__name__}: {e}); rebuild the artifact") from None
        try:
            import onnxruntime_qnn  # noqa: F401
        except ImportError:
            self.backend = "cpu"
        else:
            self.backend = "htp"
        name = (files.get("context_model") if self.backend == "htp" else None) or files.get("qdq_model")
        if not name or not (self.dir / str(name)).is_file():
            raise ArtifactError(f"{path} names no existing encoder graph ({name!r}); rebuild the artifact")
        self.model = self.dir / str(name)
        self.session = self._open(threads)
        self.tokenizer = load_tokenizer(self.dir, self.seq_len)

    def _open(self, threads: int) -> Any:
        import onnxruntime as ort

        if self.backend == "htp":
            from edgepipe.runtime import qnn

            return qnn.create_session(self.model, self.htp_arch, self.soc_model)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = intra_op_threads(threads)
        try:
            return ort.InferenceSession(str(self.model), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{self.model} cannot be loaded ({str(e)[:200]}); rebuild the artifact") from None

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            raise InputError("no texts to embed; pass at least one")
        feeds = encode(self.tokenizer, list(texts))
        return np.concatenate([self.session.run(None, f)[0] for f in feeds], axis=0).astype(np.float32)
