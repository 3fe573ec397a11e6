"""The CPU decoder's graph passes, run on an exported folder.

The decoder's passes take a model whose weights may stay in external data (they never read or
write tensors' bytes). ``optimize_dir`` writes the result beside the source; the weight file is
copied unread. A hard link would save the copy, but onnx refuses to load external data that has
several links ("potential hardlink attack"), which breaks every later ``onnx.load`` of either folder.

The default passes keep the graph's default behaviour (every new input has an initializer default), so
onnxruntime-genai and any caller that does not know about them get exactly the original outputs. The
optional ``kv_cache_fp16`` / ``kv_cache_int8`` change the past/present dtype, which the runtime reads
from the graph; ``kv_cache_int8`` also takes the calibrated ranges (``edgepipe.optimize.kv_ranges``).
onnx-ir and onnxscript take seconds to import: the passes are imported when they run.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

    from edgepipe.optimize.manager import PassManager

logger = logging.getLogger(__name__)

# The CPU decoder's passes, in the order they run: {pass name: version}. Bump a pass's version when
# its output changes: the build's stage cache keys on this. (logits_slice 2: written by onnx-ir.)
PASSES = {"logits_slice": 2}
# Passes a profile turns on (``runtime.kv_cache_dtype``: float16 -> kv_cache_fp16, int8 ->
# kv_cache_int8), run after PASSES. Only a build that asks for one has it in its versions, so every
# other build keeps its cache key. (kv_cache_int8's version also covers its scale rule, MARGIN.)
OPTIONAL_PASSES = {"kv_cache_fp16": 1, "kv_cache_int8": 1}
_KV_PASS = {"float16": "kv_cache_fp16", "int8": "kv_cache_int8"}
# the passes that need the calibrated ranges of the cache (edgepipe.optimize.kv_ranges)
NEEDS_KV_RANGES = ("kv_cache_int8",)


def pass_versions(kv_cache_dtype: str = "float32") -> dict[str, int]:
    """{pass name: version} of the passes a build with this KV cache dtype runs, in order."""
    name = _KV_PASS.get(kv_cache_dtype)
    return {**PASSES, **({name: OPTIONAL_PASSES[name]} if name else {})}


def decoder_passes(names: Iterable[str] = tuple(PASSES), kv_ranges: Path | None = None) -> PassManager:
    """The pass manager for the CPU decoder: one pass per name (of ``PASSES`` / ``OPTIONAL_PASSES``), in
    that order; ``kv_ranges`` is the calibrated ranges file the int8 cache's scales come from."""
    from edgepipe.optimize.kv_cache_fp16 import KVCacheFp16Pass
    from edgepipe.optimize.logits_slice import LogitsSlicePass
    from edgepipe.optimize.manager import PassManager

    def int8_pass() -> ir.passes.PassBase:
        from edgepipe.optimize.kv_cache_int8 import KVCacheInt8Pass, scales_from_ranges
        from edgepipe.optimize.kv_ranges import load_ranges

        if kv_ranges is None:
            raise ValueError("the kv_cache_int8 pass needs the calibrated KV ranges")  # a bug: the backend passes them
        return KVCacheInt8Pass({k: scales_from_ranges(v) for k, v in load_ranges(kv_ranges).items()})

    known: dict[str, Callable[[], ir.passes.PassBase]] = {
        "logits_slice": LogitsSlicePass, "kv_cache_fp16": KVCacheFp16Pass, "kv_cache_int8": int8_pass,
    }
    return PassManager([known[n]() for n in names])


def optimize_model(model: Any, passes: Iterable[str] = tuple(PASSES), kv_ranges: Path | None = None) -> dict[str, Any]:
    """Run the decoder's ``passes`` on ``model`` (an onnx.ModelProto, changed in place only if a pass
    applied); return {pass name: what it did} for those that applied."""
    from edgepipe.optimize.manager import apply_to_proto

    return dict(apply_to_proto(decoder_passes(passes, kv_ranges), model).details)


def optimize_dir(src_dir: Path, dst_dir: Path, versions: dict[str, int] | None = None, kv_ranges: Path | None = None) -> dict[str, Any]:
    """Optimize the decoder in ``src_dir`` into ``dst_dir`` with the passes of ``versions`` ({name:
    version}, default ``PASSES``; ``kv_ranges`` for kv_cache_int8): ``model.onnx`` rewritten, every
    other file (the external weights included) copied as is."""
    import onnx

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src_dir / "model.onnx"), load_external_data=False)
    versions = dict(PASSES if versions is None else versions)
    done = optimize_model(model, versions, kv_ranges)
    for f in src_dir.iterdir():
        if f.is_file() and f.name != "model.onnx":
            shutil.copy2(f, dst_dir / f.name)
    # tensors keep their external_data entries: the rewritten graph points at the same data file
    onnx.save_model(model, str(dst_dir / "model.onnx"))
    return {"passes": done, "versions": versions}
