"""Run an exported graph a few layers at a time, so a large fp32 reference never sits in RAM whole.

A 2.5B-parameter model is 10 GB in fp32: calibrating on it or scoring against it with one
onnxruntime session needs all of that resident, plus what onnxruntime prepacks. The builder
writes its nodes in topological order, so any cut of the node list into consecutive runs is a
valid pipeline: each piece consumes tensors that graph inputs or earlier pieces produced and
hands on what later pieces need (the residual stream, the attention-mask lengths). Pieces are
cut by the bytes of the initializers they use, loaded one at a time with their weights read
from the export's external data file, run over every input, and freed before the next.

This is the same schedule GPTQ's reference implementation uses on a GPU (one block of layers
resident, all calibration samples pushed through it), applied to an ONNX graph.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 1 << 30  # 1 GiB of weights per piece: ~4 Granite-2B layers in fp32


@dataclass
class Segment:
    """A run of consecutive nodes: what it reads from outside, what it makes, what it weighs."""

    nodes: list[Any]
    inputs: list[str]
    produced: set[str]
    initializers: list[str]
    weight_bytes: int
    # tensors this piece makes that a later piece or the caller needs
    handoff: list[str] = field(default_factory=list)


def _tensor_bytes(t: Any) -> int:
    import onnx

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def plan_segments(model: Any, max_bytes: int) -> list[Segment]:
    """Cut ``model``'s node list into consecutive pieces of at most ``max_bytes`` of initializers.

    A piece always holds at least one node, so one matrix larger than ``max_bytes`` makes a
    piece of its own rather than an error. Initializers shared by two pieces (the tied
    embedding / lm_head) count in both, as both load them.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    sizes = {name: _tensor_bytes(t) for name, t in inits.items()}
    pieces: list[list[Any]] = [[]]
    used: set[str] = set()
    weight = 0
    for node in graph.node:
        mine = {i for i in node.input if i in inits and i not in used}
        extra = sum(sizes[i] for i in mine)
        if pieces[-1] and weight + extra > max_bytes:
            pieces.append([])
            used, weight = set(), 0
            mine = {i for i in node.input if i in inits}
            extra = sum(sizes[i] for i in mine)
        pieces[-1].append(node)
        used |= mine
        weight += extra
    segments = []
    for nodes in pieces:
        produced = {o for n in nodes for o in n.output if o}
        consumed: list[str] = []
        seen: set[str] = set()
        for n in nodes:
            for i in n.input:
                if i and i not in seen and i not in produced:
                    seen.add(i)
                    consumed.append(i)
        own_inits = [i for i in consumed if i in inits]
        segments.append(
            Segment(
                nodes=nodes,
                inputs=[i for i in consumed if i not in inits],
                produced=produced,
                initializers=own_inits,
                weight_bytes=sum(sizes[i] for i in own_inits),
            )
        )
    return segments


class SegmentedRunner:
    """An fp32 export run piece by piece over a batch of inputs (see the module docstring).

    ``run(feeds, outputs, watch=..., on_watched=..., on_segment_done=...)`` pushes every feed
    dict through every piece in turn and returns, per feed, the requested graph outputs.
    ``watch`` names inner tensors (e.g. MatMul activations) to hand to ``on_watched`` as soon
    as the piece that makes them has run on a feed; ``on_segment_done`` is told which watched
    tensors are complete, so a caller can reduce and free its statistics piece by piece.
    """

    def __init__(self, model_dir: Path | str, *, max_bytes: int = DEFAULT_SEGMENT_BYTES, threads: int = 0):
        import onnx

        self.dir = Path(model_dir)
        self.path = self.dir / "model.onnx"
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.threads = threads
        self.segments = plan_segments(self.model, max_bytes)
        self._inits = {t.name: t for t in self.model.graph.initializer}
        self._graph_inputs = {i.name for i in self.model.graph.input}

    @property
    def peak_segment_bytes(self) -> int:
        return max((s.weight_bytes for s in self.segments), default=0)

    def _segment_model(self, seg: Segment, outputs: Sequence[str], dtypes: dict[str, np.dtype]) -> bytes:
        import onnx
        from onnx import helper

        graph_inputs = {i.name: i for i in self.model.graph.input}
        inputs = []
        for name in seg.inputs:
            if name in graph_inputs:
                inputs.append(graph_inputs[name])
            else:
                elem = helper.np_dtype_to_tensor_dtype(dtypes[name])
                inputs.append(helper.make_tensor_value_info(name, elem, None))
        # outputs without a declared type: onnxruntime infers them (the contrib ops have no ONNX
        # shape inference, so their types are not in the graph)
        outs = [onnx.ValueInfoProto(name=o) for o in outputs]
        graph = helper.make_graph(
            seg.nodes, f"{self.model.graph.name}_piece", inputs, outs, initializer=[self._inits[i] for i in seg.initializers]
        )
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        return m.SerializeToString()

    def run(
        self,
        feeds: Sequence[dict[str, np.ndarray]],
        outputs: Sequence[str],
        *,
        watch: Iterable[str] = (),
        on_watched: Callable[[int, str, np.ndarray], None] | None = None,
        on_segment_done: Callable[[int, list[str]], None] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        import onnxruntime as ort

        from edgepipe.runtime.model import session_options

        watch = set(watch)
        wanted = list(outputs)
        n_seg = len(self.segments)
        last_use: dict[str, int] = {}
        for k, seg in enumerate(self.segments):
            for name in seg.inputs:
                last_use[name] = k
        carry: list[dict[str, np.ndarray]] = [dict(f) for f in feeds]
        results: list[dict[str, np.ndarray]] = [{} for _ in feeds]
        for k, seg in enumerate(self.segments):
            handoff = [t for t in sorted(seg.produced) if last_use.get(t, -1) > k]
            final = [o for o in wanted if o in seg.produced]
            watched = sorted(t for t in seg.produced & watch)
            outs = list(dict.fromkeys(handoff + final + watched))
            if not outs:
                continue
            dtypes = {name: carry[0][name].dtype for name in seg.inputs if carry and name in carry[0]}
            so = session_options(self.threads)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.dir))
            sess = ort.InferenceSession(self._segment_model(seg, outs, dtypes), so, providers=["CPUExecutionProvider"])
            for f, state in enumerate(carry):
                got = dict(zip(outs, sess.run(outs, {name: state[name] for name in seg.inputs}), strict=False))
                results[f].update((name, got[name]) for name in final)
                for name in watched if on_watched else ():
                    on_watched(f, name, got[name])  # type: ignore[misc]
                state.update((name, got[name]) for name in handoff)
                for name in [n for n in state if last_use.get(n, -1) <= k]:
                    del state[name]
            del sess
            gc.collect()
            if on_segment_done:
                on_segment_done(k, watched)
            if progress:
                progress(f"fp32 reference: piece {k + 1}/{n_seg} ({seg.weight_bytes / 2**20:.0f} MiB of weights)")
        return results


def decoder_feeds(model_dir: Path | str, windows: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Whole-window feeds for a builder decoder: ``input_ids``, an all-ones mask, an empty KV cache."""
    import onnx

    from edgepipe.runtime.model import GENAI_CONFIG, DecoderSpec

    model_dir = Path(model_dir)
    spec = DecoderSpec.from_genai_config(model_dir / GENAI_CONFIG)
    model = onnx.load(str(model_dir / spec.filename), load_external_data=False)
    names = {i.name for i in model.graph.input}
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_size), dtype=np.float32)
    out = []
    for win in windows:
        ids = np.asarray(win, dtype=np.int64)[None, :]
        feed: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        for i in range(spec.num_layers):
            for pattern in (spec.past_key, spec.past_value):
                if pattern % i in names:
                    feed[pattern % i] = empty
        out.append(feed)
    return out


def reference_logits(
    model_dir: Path | str,
    windows: Sequence[np.ndarray],
    *,
    threads: int = 0,
    max_bytes: int = DEFAULT_SEGMENT_BYTES,
    progress: Callable[[str], None] | None = None,
) -> list[np.ndarray]:
    """Full-sequence logits [seq, vocab] of the export in ``model_dir`` for every window."""
    runner = SegmentedRunner(model_dir, max_bytes=max_bytes, threads=threads)
    res = runner.run(decoder_feeds(model_dir, windows), ["logits"], progress=progress)
    return [r["logits"][0] for r in res]
