"""Run a two-graph static decoder artifact (the Hexagon NPU path) with onnxruntime alone.

The NPU build (``edgepipe.npu.decoder``) ships a fixed-shape prefill graph (``seq_len`` tokens)
and a one-token decode graph over a KV cache of ``context_length`` slots, described by
``npu_config.json``. The HTP cannot take dynamic shapes, so the host does what a dynamic graph
would do inside: rotary tables, additive masks, padding, and writing each step's new K/V into
the cache. That host loop is here, numpy-only, so that a phone or board with ``onnxruntime``
(plus ``onnxruntime-qnn`` for the NPU) runs the artifact, and the build scores the very same loop
on the simulator.

Backends: ``htp`` runs the EPContext binaries (or the QDQ graphs) on the QNN execution provider,
with CPU fallback off; ``cpu`` runs the QDQ graphs on onnxruntime's CPU EP (same integer
arithmetic, for hosts without an NPU). ``auto`` picks ``htp`` when ``onnxruntime_qnn`` imports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ArtifactError, InputError
from edgepipe.runtime.kinds import NPU_CONFIG as CONFIG_FILE
from edgepipe.runtime.threads import intra_op_threads

log = logging.getLogger(__name__)

MASK_BIAS = -100.0  # exp(-100) is no weight, and the quantized range of the mask stays small
BACKENDS = ("auto", "htp", "cpu")

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def rope_tables(positions: Iterable[int], head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and signed ``sin`` ``[1, 1, T, D]`` for the given positions (HF's default rotary).

    ``sin``'s first half is negated: ``rotate_half(x) * sin == concat(x2, x1) * signed_sin``, so
    the graph needs no Neg.
    """
    pos = np.asarray(list(positions), dtype=np.float64)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = pos[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([freqs, freqs], axis=-1))
    sin = np.sin(freqs)
    signed = np.concatenate([-sin, sin], axis=-1)
    return cos.astype(np.float32)[None, None], signed.astype(np.float32)[None, None]


def prefill_bias(seq_len: int) -> np.ndarray:
    """Causal additive mask ``[1, 1, P, P]``. Right padding needs nothing more: a valid query
    never looks at a later (padded) key."""
    upper = np.triu(np.ones((seq_len, seq_len), dtype=bool), k=1)
    return np.where(upper, MASK_BIAS, 0.0).astype(np.float32)[None, None]


def decode_bias(valid: int, capacity: int) -> np.ndarray:
    """``[1, 1, 1, C + 1]``: cache slots ``< valid`` and the new token (last) are visible."""
    bias = np.full((1, 1, 1, capacity + 1), MASK_BIAS, dtype=np.float32)
    bias[..., :valid] = 0.0
    bias[..., capacity] = 0.0
    return bias


@dataclass(frozen=True)
class StaticSpec:
    """The facts of ``npu_config.json`` that the host loop needs."""

    seq_len: int
    context_length: int
    layers: int
    head_dim: int
    rope_theta: float
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    htp_arch: int
    soc_model: int | None
    files: dict[str, Any]

    @classmethod
    def read(cls, artifact: Path) -> StaticSpec:
        path = Path(artifact) / CONFIG_FILE
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            eos = cfg.get("eos_token_ids") or []
            spec = cls(
                seq_len=int(cfg["seq_len"]),
                context_length=int(cfg["context_length"]),
                layers=int(cfg["layers"]),
                head_dim=int(cfg["head_dim"]),
                rope_theta=float(cfg["rope_theta"]),
                pad_token_id=int(cfg["pad_token_id"]),
                eos_token_ids=tuple(int(e) for e in eos),
                htp_arch=int(cfg["htp_arch"]),
                soc_model=None if cfg.get("soc_model") is None else int(cfg["soc_model"]),
                files=dict(cfg["files"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} is missing or malformed ({type(e).__name__}: {e}); rebuild the artifact") from None
        if not 0 < spec.seq_len <= spec.context_length:
            raise ArtifactError(f"{path}: seq_len {spec.seq_len} does not fit context_length {spec.context_length}; rebuild")
        return spec




class StaticDecoder:
    """Host side of the two graphs: the KV cache of capacity C, rotary tables, masks, the loop.

    ``run_prefill`` / ``run_decode`` are ``feeds -> outputs`` callables (an ORT session's ``run``
    on the CPU or the HTP), so the same loop drives the fp32 graphs and the quantized ones.
    """

    def __init__(self, spec: Any, seq_len: int, capacity: int) -> None:
        # ``spec`` needs ``layers``, ``head_dim`` and ``rope_theta`` (a StaticSpec, or the build's DecoderSpec)
        self.spec, self.seq_len, self.capacity = spec, seq_len, capacity
        self._pcos, self._psin = rope_tables(range(seq_len), spec.head_dim, spec.rope_theta)
        self._pbias = prefill_bias(seq_len)
        self._dcos, self._dsin = rope_tables(range(capacity), spec.head_dim, spec.rope_theta)

    def prefill_feeds(self, ids: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 1 <= len(ids) <= self.seq_len:
            raise InputError(
                f"a prompt of {len(ids)} tokens does not fit the prefill graph (1..{self.seq_len}); shorten it"
            )
        padded = np.full((1, self.seq_len), pad_id, dtype=np.int64)
        padded[0, : len(ids)] = ids
        return {"input_ids": padded, "cos": self._pcos, "sin": self._psin, "attn_bias": self._pbias}

    def cache_from_prefill(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """The prefill's present K/V (already at capacity), as writable float32 arrays."""
        return [np.array(o, dtype=np.float32) for o in outputs[1:]]

    def decode_feeds(self, token: int, position: int, cache: list[np.ndarray]) -> dict[str, np.ndarray]:
        if not 0 <= position < self.capacity:
            raise InputError(
                f"position {position} is beyond the KV cache capacity {self.capacity}; raise npu.context_length"
            )
        feeds = {
            "input_ids": np.asarray([[token]], dtype=np.int64),
            "cos": self._dcos[:, :, position : position + 1],
            "sin": self._dsin[:, :, position : position + 1],
            "attn_bias": decode_bias(position, self.capacity),
        }
        for i in range(self.spec.layers):
            feeds[f"past_key_{i}"] = cache[2 * i]
            feeds[f"past_value_{i}"] = cache[2 * i + 1]
        return feeds

    @staticmethod
    def write_cache(cache: list[np.ndarray], outputs: list[np.ndarray], position: int) -> None:
        for slot, new in zip(cache, outputs[1:], strict=True):
            slot[:, :, position : position + 1, :] = new

    def teacher_forced(
        self,
        run_prefill: Runner,
        run_decode: Runner | None,
        window: np.ndarray,
        pad_id: int,
        *,
        cache: list[np.ndarray] | None = None,
        prefill_logits: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[len(window), V]`` for ``window``: its first P tokens through the prefill
        graph, the rest one by one through the decode graph (the true next token fed each step).

        The two phases can run apart (one live HTP session at a time): call with
        ``run_decode=None`` to get only the prefill logits and cache, then again with
        ``run_prefill`` unused and ``cache`` / ``prefill_logits`` given.
        """
        P = min(self.seq_len, len(window))
        if cache is None or prefill_logits is None:
            out = run_prefill(self.prefill_feeds(window[:P], pad_id))
            prefill_logits = np.asarray(out[0][0, :P], dtype=np.float32)
            cache = self.cache_from_prefill(out)
        rows = [prefill_logits]
        if run_decode is not None:
            for pos in range(P, len(window)):
                out = run_decode(self.decode_feeds(int(window[pos]), pos, cache))
                self.write_cache(cache, out, pos)
                rows.append(np.asarray(out[0][0], dtype=np.float32))
        return np.concatenate(rows, axis=0), cache

    def greedy(self, run_prefill: Runner, run_decode: Runner, prompt: np.ndarray, new_tokens: int, pad_id: int) -> list[int]:
        """Greedy continuation of ``prompt``: prefill once, then ``new_tokens - 1`` decode steps."""
        prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        n = len(prompt)
        if n + new_tokens > self.capacity:
            raise InputError(
                f"{n} + {new_tokens} tokens exceed the KV cache capacity {self.capacity}; ask for fewer tokens"
            )
        out = run_prefill(self.prefill_feeds(prompt, pad_id))
        cache = self.cache_from_prefill(out)
        token = int(np.argmax(out[0][0, n - 1]))
        tokens = [token]
        for pos in range(n, n + new_tokens - 1):
            out = run_decode(self.decode_feeds(token, pos, cache))
            self.write_cache(cache, out, pos)
            token = int(np.argmax(out[0][0, 0]))
            tokens.append(token)
        return tokens


class StaticCausalLM:
    """A static-graph artifact behind :class:`edgepipe.runtime.lm.LM`: ``stepper(total).step(ids)``
    prefills through the prefill graph, then decodes one token at a time.

    On the HTP only one session is alive at a time (the simulator fails a run with two live
    sessions, QNN error 1100; a phone's HTP memory is also tight), so the stepper closes the prefill
    session before it opens the decode one.
    """

    # the decode graph takes one token and the host cache cannot rewind: no speculative decoding
    multi_token_steps = False

    def __init__(self, artifact: Path | str, *, backend: str = "auto", threads: int = 0) -> None:
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.dir = Path(artifact)
        self.spec = StaticSpec.read(self.dir)
        self.threads = threads
        if backend == "auto":
            try:
                import onnxruntime_qnn  # noqa: F401
            except ImportError:
                backend = "cpu"
            else:
                backend = "htp"
        self.backend = backend
        self.host = StaticDecoder(self.spec, self.spec.seq_len, self.spec.context_length)
        self.models = {mode: self._model_path(mode) for mode in ("prefill", "decode")}
        self._sessions: dict[str, tuple[Any, list[str]]] = {}  # mode -> (session, output names)
        self.runner("prefill")  # a graph that cannot load fails here, before any output
        dim = self._sessions["prefill"][0].get_outputs()[0].shape[-1]
        self._vocab_size = int(dim) if isinstance(dim, int) else 0

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.spec.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _model_path(self, mode: str) -> Path:
        files = self.spec.files
        name = files.get(f"{mode}_context_model") if self.backend == "htp" else None
        name = name or files.get(f"{mode}_qdq")
        if not name:
            raise ArtifactError(f"{self.dir / CONFIG_FILE} names no {mode} graph; rebuild the artifact")
        path = self.dir / str(name)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the artifact")
        return path

    def _open(self, mode: str) -> Any:
        import onnxruntime as ort

        if self.backend == "htp":
            from edgepipe.runtime import qnn  # onnxruntime-qnn; no build toolchain

            return qnn.create_session(self.models[mode], self.spec.htp_arch, self.spec.soc_model)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = intra_op_threads(self.threads)
        try:
            return ort.InferenceSession(str(self.models[mode]), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{self.models[mode]} cannot be loaded ({str(e)[:200]}); rebuild the artifact") from None

    def runner(self, mode: str) -> Runner:
        """``feeds -> outputs`` for ``mode``; on the HTP this closes the other graph's session."""
        if mode not in self._sessions:
            if self.backend == "htp":
                self._sessions.clear()  # drop the other session before the next one is created
            sess = self._open(mode)
            self._sessions[mode] = (sess, [o.name for o in sess.get_outputs()])
        sess, names = self._sessions[mode]
        return lambda feeds: sess.run(names, feeds)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``[len(ids), V]`` of one window from an empty cache (what ``score`` takes)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self.stepper(len(ids)).step(ids, last_only=False)

    def stepper(self, total: int) -> StaticStepper:
        if total > self.spec.context_length:
            raise InputError(
                f"{total} tokens exceed the artifact's KV cache of {self.spec.context_length}; ask for fewer new tokens"
            )
        return StaticStepper(self)


class StaticStepper:
    """``step(ids)``: the first call prefills (prompts longer than the prefill graph continue
    token by token through the decode graph), later calls append one token each."""

    def __init__(self, lm: StaticCausalLM) -> None:
        self.lm = lm
        self.position = 0
        self.cache: list[np.ndarray] | None = None

    def step(self, ids: np.ndarray, *, last_only: bool = True) -> np.ndarray:
        lm, host = self.lm, self.lm.host
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            raise InputError("no tokens to run; pass a non-empty prompt")
        if self.position + len(ids) > host.capacity:
            raise InputError(
                f"{self.position + len(ids)} tokens exceed the artifact's KV cache of {host.capacity}; ask for fewer"
            )
        rows: list[np.ndarray] = []
        rest = ids
        if self.cache is None:
            P = min(len(ids), host.seq_len)
            out = lm.runner("prefill")(host.prefill_feeds(ids[:P], lm.spec.pad_token_id))
            self.cache = host.cache_from_prefill(out)
            rows.append(np.asarray(out[0][0, :P], dtype=np.float32))
            self.position, rest = P, ids[P:]
        if len(rest):
            run = lm.runner("decode")
            for token in rest:
                out = run(host.decode_feeds(int(token), self.position, self.cache))
                host.write_cache(self.cache, out, self.position)
                rows.append(np.asarray(out[0][0], dtype=np.float32))
                self.position += 1
        logits = np.concatenate(rows, axis=0)
        return logits[-1:] if last_only else logits
