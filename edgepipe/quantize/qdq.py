"""QDQ quantization for the Hexagon NPU: the one :class:`QdqConfig`, calibration feeds, quantizing.

QNN runs QuantizeLinear/DequantizeLinear graphs (activations uint8/uint16, weights int8/uint8, per
channel where QNN allows); onnxruntime's QNN helpers pre-process the fp32 graph and pick the
scheme, and MinMax ranges are calibrated on real text. Decoders calibrate both static graphs
(prefill windows, decode steps over a real KV cache); encoders calibrate on passages of sentences.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError

Feeds = list[dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class QdqConfig:
    """The QDQ scheme, from the target's ``npu`` section."""

    activation_type: str = "uint16"
    weight_type: str = "int8"
    per_channel: bool = True

    @classmethod
    def from_npu(cls, npu: Any) -> QdqConfig:
        return cls(npu.activation_type, npu.weight_type, npu.per_channel)

    def describe(self) -> str:
        return f"activations {self.activation_type}, weights {self.weight_type}{' per-channel where QNN allows' if self.per_channel else ''}"


def qdq_quantize(pre: Path, out: Path, feeds: Feeds, cfg: QdqConfig, *, stride: int | None = None, external_data: bool | None = None) -> None:
    """QDQ-quantize the QNN-preprocessed model ``pre`` into ``out``, calibrated on ``feeds``.

    ``stride=1`` computes MinMax ranges run by run and merges them (the reader serves feeds in
    ranges, which strided calibration asks for and plain calibration never does);
    ``external_data`` overrides where weights are written.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(feeds))

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(feeds[start_index:end_index])

        def get_next(self) -> Any:
            return next(self._it, None)

    types = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16, "int8": QuantType.QInt8}
    qcfg = get_qnn_qdq_config(
        str(pre),
        Reader(),
        activation_type=types[cfg.activation_type],
        weight_type=types[cfg.weight_type],
        per_channel=cfg.per_channel,
        **({"stride": stride} if stride is not None else {}),
    )
    if external_data is not None:
        qcfg.use_external_data_format = external_data
    quantize(str(pre), str(out), qcfg)


def _preprocess(fp32: Path, pre: Path) -> Path:
    """onnxruntime's QNN pre-processing (e.g. LayerNorm / Gelu fusions QNN wants); ``fp32`` as it is
    when there is nothing to do."""
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    return pre if qnn_preprocess_model(str(fp32), str(pre)) else fp32


def quantize_decoder_graph(fp32: Path, out: Path, feeds: Feeds, cfg: QdqConfig, workdir: Path) -> None:
    """QNN pre-processing + QDQ quantization of one static decoder graph, calibrated (MinMax) on ``feeds``.

    Ranges are computed per calibration run and merged (``CalibStridedMinMax`` = 1): the augmented
    graph outputs every tensor, and keeping them for all runs of a 30-layer model would need
    gigabytes. (``CalibMaxIntermediateOutputs`` is no alternative: onnxruntime 1.24's MinMax
    calibrator drops the collected outputs without computing their ranges.)
    """
    workdir.mkdir(parents=True, exist_ok=True)
    pre = _preprocess(fp32, workdir / (fp32.stem + ".pre.onnx"))
    # one self-contained file per graph (well under 2 GB)
    qdq_quantize(pre, out, feeds, cfg, stride=1, external_data=False)


def quantize_encoder_graph(fp32: Path, out: Path, feeds: Feeds, cfg: QdqConfig, workdir: Path) -> dict[str, int]:
    """Rewrite (Erf-GELU -> Gelu), pre-process and QDQ-quantize ``fp32`` into ``out``, then store
    LayerNorm weights as uint8 (the HTP rejects int8 ones); return the rewrite counts."""
    import onnx

    from edgepipe.optimize.gelu_fusion import fuse_erf_gelu
    from edgepipe.optimize.layernorm_uint8 import layernorm_weights_to_uint8

    workdir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    model = onnx.load(str(fp32))
    counts["erf_gelu_fused"] = fuse_erf_gelu(model)
    rewritten = workdir / "rewritten.onnx"
    onnx.save(model, str(rewritten))
    pre = _preprocess(rewritten, workdir / "preprocessed.onnx")
    qdq_quantize(pre, out, feeds, cfg)
    qmodel = onnx.load(str(out))
    counts["layernorm_uint8"] = layernorm_weights_to_uint8(qmodel)
    onnx.save(qmodel, str(out))
    return counts


def decoder_calibration_feeds(host: Any, fp32: dict[str, Path], ids: np.ndarray, samples: int, pad_id: int) -> tuple[Feeds, Feeds]:
    """Prefill feeds (full windows of calibration text) and decode feeds with a real KV cache.

    ``host`` is the :class:`~edgepipe.runtime.static_lm.StaticDecoder` of the graphs. Decode feeds
    come from the fp32 graphs on the CPU: each window is prefilled with a prompt of a different
    length (short to full, right-padded), then two teacher-forced decode steps are recorded, so
    the decode graph is calibrated on the cache states and positions it meets.
    """
    import onnxruntime as ort

    seq_len = host.seq_len
    if len(ids) < seq_len + 2:
        raise InputError(f"the calibration text has {len(ids)} tokens; the decoder needs at least {seq_len + 2}")
    n = max(1, min(samples, (len(ids) - 2) // seq_len))
    starts = np.linspace(0, len(ids) - seq_len - 2, n).astype(int)
    prefill = [host.prefill_feeds(ids[s : s + seq_len], pad_id) for s in starts]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    pre = ort.InferenceSession(str(fp32["prefill"]), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(fp32["decode"]), so, providers=["CPUExecutionProvider"])
    decode = []
    for k, s in enumerate(starts):
        plen = int(np.clip(round(seq_len * (k + 1) / n), 4, seq_len))
        cache = host.cache_from_prefill(pre.run(None, host.prefill_feeds(ids[s : s + plen], pad_id)))
        for pos in range(plen, plen + 2):
            feeds = host.decode_feeds(int(ids[s + pos]), pos, cache)
            decode.append({name: np.array(v) for name, v in feeds.items()})
            host.write_cache(cache, dec.run(None, feeds), pos)
    return prefill, decode


def calibration_passages(text: str, samples: int) -> list[str]:
    """``samples`` passages of 1-4 consecutive sentences: varied lengths, so that an encoder's
    calibration sees short, padded inputs as well as inputs that fill the sequence."""
    from edgepipe.texts import split_sentences

    sentences = split_sentences(text)
    if len(sentences) < 4:
        raise InputError("calibration text is too short: give at least a few paragraphs of real sentences")
    step = max(1, len(sentences) // samples)
    out = []
    for k in range(samples):
        n = 1 + (k % 4)
        start = (k * step) % len(sentences)
        out.append(" ".join(sentences[start : start + n]))
    return out

