"""A causal LM session over an onnxruntime-genai-style decoder graph, with plain onnxruntime.

The graph (as the onnxruntime-genai model builder writes it) takes ``input_ids``,
``attention_mask`` and ``past_key_values.{i}.key/value`` and returns ``logits`` and
``present.{i}.key/value``. We drive it ourselves because onnxruntime-genai has no aarch64
Linux wheel, so a Raspberry Pi cannot use its generator.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgepipe.errors import ArtifactError
from edgepipe.runtime.pages import release_file_pages
from edgepipe.runtime.threads import intra_op_threads
from edgepipe.runtime.weights import MappedWeights

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# graph input added by edgepipe.optimize.logits_slice: first position whose logits are computed
LOGITS_START = "logits_start"
_LAST = np.array([-1], dtype=np.int64)
# A stepper feeds a longer prompt in runs of this many tokens. The activations onnxruntime holds
# (its arena keeps the largest run's) grow with a run's length: on the default model, 128-token
# runs cut peak RSS by 8-10 % against one 512-token run at the same or better prefill speed
# (benchmarks/session_options.py, int4 and int8 artifacts; 64 saves a little more, 256 less).
DEFAULT_PREFILL_CHUNK = 128
_ALL = np.array([0], dtype=np.int64)
_KV_DTYPES: dict[str, type[np.generic]] = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to know about a decoder graph (from ``genai_config.json``)."""

    filename: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    # True (the builder's GroupQueryAttention graphs): present is written in place into a past
    # buffer of any length. False (edgepipe.export.generic's graphs): present = past + new positions.
    share_buffer: bool = True

    @classmethod
    def from_genai_config(cls, path: Path) -> DecoderSpec:
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            model = cfg["model"]
            dec = model["decoder"]
            eos = model.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),) if eos is not None else ()
            return cls(
                filename=str(dec["filename"]),
                num_layers=int(dec["num_hidden_layers"]),
                num_kv_heads=int(dec["num_key_value_heads"]),
                head_size=int(dec["head_size"]),
                vocab_size=int(model["vocab_size"]),
                context_length=int(model.get("context_length", 2048)),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                bos_token_id=model.get("bos_token_id"),
                past_key=dec["inputs"]["past_key_names"],
                past_value=dec["inputs"]["past_value_names"],
                present_key=dec["outputs"]["present_key_names"],
                present_value=dec["outputs"]["present_value_names"],
                share_buffer=bool(cfg.get("search", {}).get("past_present_share_buffer", True)),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} is missing or malformed ({type(e).__name__}: {e}); rebuild the artifact") from None


def session_options(threads: int = 0, *, spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False``: worker threads sleep between ops instead of busy-waiting. Spinning is
    faster on idle cores; when other processes share the cores a spinning thread burns the time
    slice its partner needs (measured here at load 8-10: decode 1.6x, prefill 1.1x faster without)."""
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Spin only while a run is active. A model and its draft alternate runs, each on its own pool:
    # left spinning after its run, the idle session's workers took the cores from the other one
    # (fp32 SmolLM2 step 23 -> 45 ms after a draft step; draft decoding 0.8x plain instead of 1.5x,
    # benchmarks/RESULTS.md). A lone session decodes and prefills as fast either way.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.intra_op_num_threads = intra_op_threads(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Never load custom-op libraries named by an artifact: the runtime registers none.
    so.log_severity_level = 3
    return so


class CausalLM:
    """One decoder session and its KV cache layout (an :class:`edgepipe.runtime.lm.LM`)."""

    # a step takes any number of tokens and its stepper can rewind (speculative decoding)
    multi_token_steps = True

    def __init__(
        self,
        model_dir: Path | str,
        *,
        threads: int = 0,
        spinning: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        release_pages: bool = True,
    ):
        self.dir = Path(model_dir)
        self.prefill_chunk = int(prefill_chunk)  # a stepper feeds longer prompts in runs of this many (0: whole)
        self.spec = DecoderSpec.from_genai_config(self.dir / GENAI_CONFIG)
        path = self.dir / self.spec.filename
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the artifact")
        options = session_options(threads, spinning=spinning)
        # the weights from the runtime's own mapping, its pages given back while onnxruntime prepacks
        # (edgepipe.runtime.weights; release_pages=False leaves loading to onnxruntime, for comparisons)
        weights = MappedWeights.open(path) if release_pages else None
        if weights is not None:
            weights.add_to(options)
        try:
            with weights.released_while() if weights is not None else nullcontext():
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            msg = str(e).splitlines()[0][:300]
            raise ArtifactError(f"onnxruntime cannot load {path}: {msg}") from None
        # the session reads the table (and any unpacked weight) in place from the mapping, which outlives
        # it (MappedWeights.open); what it leaves resident is given back when it goes
        if weights is not None:
            weights.serve(self.session)
        # and the pages of what onnxruntime mapped itself (tensors the reader left to it)
        data = path.with_name(path.name + ".data")
        released = release_file_pages(data) if release_pages and data.is_file() else 0
        self.released_bytes = released + (weights.mapped_bytes if weights is not None else 0)
        self._input_names = {i.name for i in self.session.get_inputs()}
        out = self.session.get_outputs()
        self._output_names = [o.name for o in out]
        self._present_names = [
            n for i in range(self.spec.num_layers) for n in (self.spec.present_key % i, self.spec.present_value % i)
        ]
        self._past_names = [
            n for i in range(self.spec.num_layers) for n in (self.spec.past_key % i, self.spec.past_value % i)
        ]
        # artifacts built before the logits_slice pass lack the input: they compute every position
        # (an input with an initializer default is listed among the overridable initializers)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.can_slice_logits = LOGITS_START in self._input_names | overridable
        dtypes = {i.name: i.type for i in self.session.get_inputs()}
        # the cache's element type as the graph declares it (edgepipe.optimize's kv_cache_fp16 / kv_cache_int8):
        # the stepper's buffers and the empty cache are made of it
        self.kv_dtype = _KV_DTYPES.get(dtypes.get(self._past_names[0], ""), np.float32)
        logits_out = next((o for o in out if o.name == "logits"), None)
        self.logits_dtype = np.float16 if logits_out is not None and logits_out.type == "tensor(float16)" else np.float32
        width = logits_out.shape[-1] if logits_out is not None and logits_out.shape else None
        self.logits_width = width if isinstance(width, int) else self.spec.vocab_size

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.spec.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def weight_bytes(self) -> int:
        """Bytes of the graph and its external weights (what a decode step reads)."""
        graph = self.dir / self.spec.filename
        return sum(p.stat().st_size for p in (graph, graph.with_name(graph.name + ".data")) if p.is_file())

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_size)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self._past_names]

    def forward(
        self, input_ids: np.ndarray, cache: list[np.ndarray], *, last_only: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run ``input_ids`` [batch, seq] after ``cache``; return logits [batch, seq, vocab] and the new cache.

        ``last_only``: logits of the last position only ([batch, 1, vocab]), which is all generation
        needs; graphs with the ``logits_start`` input then skip the lm_head on the other positions.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past_len = cache[0].shape[2]
        feeds: dict[str, Any] = {"input_ids": input_ids}
        if "attention_mask" in self._input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
        if "position_ids" in self._input_names:
            feeds["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :].repeat(batch, 0)
        feeds.update(zip(self._past_names, cache, strict=False))
        if last_only and self.can_slice_logits:
            feeds[LOGITS_START] = _LAST
        outputs = self.session.run(["logits", *self._present_names], feeds)
        logits = outputs[0]
        return (logits[:, -1:] if last_only and logits.shape[1] > 1 else logits), outputs[1:]

    def stepper(self, max_len: int) -> KVStepper | ConcatStepper:
        """A decoding state for ``max_len`` positions: a preallocated, in-place KV buffer (KVStepper) for
        graphs that share past and present, else a cache that grows by the graph's own concat."""
        if self.spec.share_buffer:
            return KVStepper(self, max_len)
        return ConcatStepper(self, max_len)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits for a whole sequence from an empty cache (prefill only)."""
        logits, _ = self.forward(np.asarray(input_ids)[None, :], self.empty_cache())
        out: np.ndarray = logits[0]
        return out


class KVStepper:
    """Incremental decoding with one preallocated KV buffer per layer, bound with IO binding.

    GroupQueryAttention writes the new keys/values in place when its past and present outputs
    are the same buffer, so no step allocates or copies the cache (``forward`` concatenates the
    whole cache on every step, which grows with the context). The attention mask spans the valid
    positions; the buffer may be longer.

    The host side of a step allocates nothing either (onnxruntime-genai's generator does the same
    in C++; ours was ~0.5 ms of an 11 ms step): the token ids are written into a preallocated
    array, the mask and positions are prefixes of preallocated arrays, and the logits are written
    by onnxruntime straight into a buffer this stepper owns, so a step returns a view of that
    buffer, **valid until the next step** (copy it to keep it). Reading the outputs back through
    the binding would wrap all 2 x layers present tensors in Python objects on every step.
    """

    def __init__(self, lm: CausalLM, max_len: int):
        self.lm = lm
        self.max_len = int(max_len)
        self.length = 0
        self.prefill_chunk = lm.prefill_chunk
        spec = lm.spec
        shape = (1, spec.num_kv_heads, self.max_len, spec.head_size)
        self._kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=lm.kv_dtype)) for _ in lm._past_names]
        self._binding = lm.session.io_binding()
        for past, present, buf in zip(lm._past_names, lm._present_names, self._kv, strict=False):
            self._binding.bind_ortvalue_input(past, buf)
            self._binding.bind_ortvalue_output(present, buf)
        # host buffers the per-step inputs and the logits are views of (OrtValues over numpy memory
        # are not copies); the mask is all ones: its length is what tells the graph how many
        # positions are valid
        self._ids = np.zeros((1, self.max_len), dtype=np.int64)
        self._mask = np.ones((1, self.max_len), dtype=np.int64)
        self._positions = np.arange(self.max_len, dtype=np.int64)[None, :]
        self._logits = np.empty((1, 1, lm.logits_width), dtype=lm.logits_dtype)
        self._shape: tuple[int, int, int] | None = None  # (ids, logit rows, first row) the binding holds
        self._held: list[ort.OrtValue] = []  # what the binding points into, kept alive with it

    def _bind_shape(self, n: int, rows: int, at: int) -> None:
        """(Re)bind what follows a run's shape (its ``n`` ids, ``rows`` logit rows written from row
        ``at`` of the buffer): only when it changes. One logit row of several ids is the last's."""
        held = [
            ort.OrtValue.ortvalue_from_numpy(self._ids[:, :n]),
            ort.OrtValue.ortvalue_from_numpy(self._logits[:, at : at + rows]),
        ]
        b = self._binding
        b.bind_ortvalue_input("input_ids", held[0])
        b.bind_ortvalue_output("logits", held[1])
        if self.lm.can_slice_logits:
            # bind_cpu_input rejects an input that has an initializer default; OrtValues are accepted
            held.append(ort.OrtValue.ortvalue_from_numpy(_LAST if rows < n else _ALL))
            b.bind_ortvalue_input(LOGITS_START, held[-1])
        self._held, self._shape = held, (n, rows, at)

    def _run(self, ids: np.ndarray, rows: int, at: int) -> None:
        n = ids.shape[0]
        start, total = self.length, self.length + n
        if self._shape != (n, rows, at):
            self._bind_shape(n, rows, at)
        self._ids[0, :n] = ids
        b = self._binding
        if "attention_mask" in self.lm._input_names:
            b.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self._mask[:, :total]))
        if "position_ids" in self.lm._input_names:
            b.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(self._positions[:, start:total]))
        self.lm.session.run_with_iobinding(b)
        self.length = total

    def step(self, ids: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """Feed ``ids`` (1-D) after what was fed before; return their logits [seq, vocab]
        (``last_only``: [1, vocab], the last position's, see ``CausalLM.forward``): a view of
        this stepper's buffer that the next step overwrites.

        More than ``prefill_chunk`` ids run in chunks of that many: the activations onnxruntime
        keeps for a run grow with its length, the keys/values do not care how they were fed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        width = ids.shape[0]
        if self.length + width > self.max_len:
            raise ValueError(f"KV buffer of {self.max_len} positions is full")
        sliced = last_only and self.lm.can_slice_logits
        needed = 1 if sliced else width
        if needed > self._logits.shape[1]:
            self._logits = np.empty((1, needed, self._logits.shape[2]), dtype=self._logits.dtype)
            self._shape = None
        chunk = self.prefill_chunk if self.prefill_chunk > 0 else max(width, 1)
        for i in range(0, width, chunk):
            part = ids[i : i + chunk]
            self._run(part, 1 if sliced else part.shape[0], 0 if sliced else i)
        logits: np.ndarray = self._logits[0, :needed]
        return logits[-1:] if last_only and needed > 1 else logits

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on: the mask covers only the first ``length``
        positions and the next step writes its keys/values over the rest."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind {self.length} positions to {length}")
        self.length = int(length)


class ConcatStepper:
    """Incremental decoding for graphs whose ``present`` is ``past`` with the new positions appended
    (plain attention ops, as torch.onnx exports them): each step feeds the previous step's presents."""

    def __init__(self, lm: CausalLM, max_len: int):
        self.lm = lm
        self.max_len = int(max_len)
        self.length = 0
        self._cache = lm.empty_cache()

    def step(self, ids: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if self.length + ids.shape[1] > self.max_len:
            raise ValueError(f"KV buffer of {self.max_len} positions is full")
        logits, self._cache = self.lm.forward(ids, self._cache, last_only=last_only)
        self.length += ids.shape[1]
        out: np.ndarray = logits[0]
        return out

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (the cache is cut to its first ``length``)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind {self.length} positions to {length}")
        if length < self.length:
            self._cache = [np.ascontiguousarray(c[:, :, :length]) for c in self._cache]
        self.length = int(length)
