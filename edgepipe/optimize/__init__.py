"""Graph-only rewrites of a decoder export that make it cheaper to run, never different in what it computes.

Each pass lives in its own module, takes an ``onnx.ModelProto`` whose weights may stay in external
data (passes never read or write tensors' bytes) and returns what it did, or ``None`` when it did
not apply (the pass says why in the log). ``optimize_dir`` runs them on an exported folder and
writes the result beside it; the weight file is copied unread. A hard link would save the copy, but
onnx refuses to load external data that has several links ("potential hardlink attack"), which
breaks every later ``onnx.load`` of either folder.

The passes keep the graph's default behaviour (every new input has an initializer default), so
onnxruntime-genai and any caller that does not know about them get exactly the original outputs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["PASSES", "optimize_dir", "optimize_model"]

# Bump a pass's version when its output changes: the build's stage cache keys on this.
PASSES = {"logits_slice": 1}


def optimize_model(model: Any) -> dict[str, Any]:
    """Run every pass on ``model`` in place; return {pass name: what it did} for those that applied."""
    from edgepipe.optimize.logits_slice import slice_logits

    done: dict[str, Any] = {}
    result = slice_logits(model)
    if result is not None:
        done["logits_slice"] = result
    return done


def optimize_dir(src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    """Optimize the decoder in ``src_dir`` into ``dst_dir``: ``model.onnx`` rewritten, every other
    file (the external weights included) copied as is."""
    import onnx

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src_dir / "model.onnx"), load_external_data=False)
    done = optimize_model(model)
    for f in src_dir.iterdir():
        if f.is_file() and f.name != "model.onnx":
            shutil.copy2(f, dst_dir / f.name)
    # tensors keep their external_data entries: the rewritten graph points at the same data file
    onnx.save_model(model, str(dst_dir / "model.onnx"))
    return {"passes": done, "versions": dict(PASSES)}
