"""The target profile schema: frozen dataclasses. A profile states a board's facts, the formats and
budgets it allows, never facts about one particular model."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Cpu:
    """CPU / ISA facts of the device. ``qemu_cpu`` is the model qemu emulates for it."""

    arch: Literal["x86_64", "aarch64"]
    model: str
    isa: tuple[str, ...] = ()
    cores: int = 4
    ram_gb: float = 8.0
    mem_bandwidth_gbps: float = 10.0  # sustained read bandwidth, for decode-speed estimates
    gops: float = 50.0  # sustained int8 GOP/s over all cores, for prefill estimates
    qemu_cpu: str | None = None


@dataclasses.dataclass(frozen=True)
class KernelTime:
    """One format's ``MatMulNBits`` time per weight on the device, relative to the profile's base format
    (``bits`` / ``block_size`` / ``symmetric``): ``decode`` at one row (a decode step), ``prefill`` at
    512 rows. Measured there with ``benchmarks/formats.py``; :mod:`edgepipe.quantize.kernel_time`."""

    format: str
    decode: float
    prefill: float | None = None


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How weights are stored. ``bits`` applies to every transformer MatMul except the
    layers named in ``eight_bit_layers``; the tied embedding / lm_head table has its own bits.

    A size budget -- ``bits_per_weight`` (mean stored bits over every quantized matrix, the table
    included) or ``max_mb`` (the artifact, MiB) -- lets the build choose each matrix's format among
    ``formats`` from its measured sensitivity (``edgepipe.quantize.allocate``), so a profile never
    names one model's layers; ``eight_bit_ops`` / ``eight_bit_layers`` then pin matrices to 8 bits.
    """

    bits: Literal[4, 8, 32] = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    algorithm: Literal["rtn", "mse", "imatrix", "gptq"] = "imatrix"
    embedding_bits: Literal[4, 8, 32] = 8
    embedding_block_size: int | None = None  # default: block_size
    eight_bit_layers: tuple[str, ...] = ()  # whole layers: "first", "last", "3", "0-3"
    eight_bit_ops: tuple[str, ...] = ()  # "down_proj" everywhere, or "down_proj@0-3,26-29" in those layers
    eight_bit_block_size: int | None = None  # block of the 8-bit matrices (default: block_size)
    eight_bit_algorithm: Literal["rtn", "mse", "imatrix", "gptq"] = "rtn"  # how 8-bit matrices are quantized
    formats: tuple[str, ...] = ()  # what the allocator may choose: "int4/b32/asym", "int8/b64/asym" (default: bits and 8-bit blocks above)
    bits_per_weight: float | None = None  # size budget: mean stored bits per quantized weight
    max_mb: float | None = None  # size budget: the artifact in MiB (one of the two)
    sensitivity: Literal["fisher", "fisher-output", "relative-output-error"] = "fisher"  # the allocator's proxy (edgepipe.quantize.sensitivity)
    kernel_time: tuple[KernelTime, ...] = ()  # per format, measured on the device: what the allocation costs in time
    max_decode_time: float | None = None  # time budget: decode kernel time as a fraction of the base format's everywhere


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    execution_provider: Literal["CPUExecutionProvider", "QNNExecutionProvider"] = "CPUExecutionProvider"
    threads: int = 0  # 0: one per physical core
    context_length: int = 2048
    # The KV cache's element type. "float16" halves it (SmolLM2-135M: 94 -> 47 MB at 2048 positions)
    # by running attention in float16 (optimize pass kv_cache_fp16; the rest stays float32; builder
    # graphs only). onnxruntime 1.31's float16 GroupQueryAttention has no flash kernel: decode 0.33x on
    # x86 at 512 positions (benchmarks/RESULTS.md); the aarch64 wheel has the same kernels, so no
    # shipped profile turns it on. "int8" quarters it (optimize pass kv_cache_int8: static per-channel
    # scales calibrated on the calibration text, attention float32; builder graphs only): decode
    # 1.4-1.5x faster and peak RSS -67 MB at 2048 positions on x86, KL +0.0005, but prefill 0.72-0.83x at
    # 512 tokens (onnxruntime's int8-cache attention is 2-3.6x slower for multi-token runs); no shipped
    # profile turns it on (benchmarks/RESULTS.md).
    kv_cache_dtype: Literal["float32", "float16", "int8"] = "float32"


@dataclasses.dataclass(frozen=True)
class Budgets:
    """What an artifact must meet to ship. ``None`` means unchecked."""

    max_ram_mb: float | None = None
    max_artifact_mb: float | None = None
    max_ppl_increase_pct: float | None = None
    min_top1_agreement: float | None = None
    min_decode_tok_s: float | None = None  # on the reference device, checked only there
    max_kl_divergence: float | None = None  # mean KL(fp32 || quantized) per scored token, in nats: an absolute bound


@dataclasses.dataclass(frozen=True)
class Npu:
    """A Qualcomm Hexagon NPU (HTP) and the QDQ scheme it is given (used by ``edgepipe.npu``).

    The HTP runs only static shapes, so ``seq_len`` fixes the encoder's sequence length (and a
    decoder's prefill length); ``context_length`` is a decoder's fixed KV-cache capacity.
    ``soc_model`` is QNN's SoC id (e.g. 57 = SM8650), passed to the compiler when known.
    """

    htp_arch: Literal[68, 69, 73, 75, 79, 81]
    soc_model: int | None = None
    activation_type: Literal["uint8", "uint16"] = "uint16"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    seq_len: int = 128
    context_length: int = 256
    allow_cpu_fallback: bool = False
    min_cosine: float = 0.99  # every eval sentence: cosine(NPU, fp32 CPU) at least this
    min_retrieval_agreement: float = 0.9  # nearest-neighbour top-1 agreement with fp32
    calibration_samples: int = 64


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    cpu: Cpu
    quantization: Quantization
    runtime: RuntimeOptions
    budgets: Budgets
    alias_of: str | None = None
    npu: Npu | None = None

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


