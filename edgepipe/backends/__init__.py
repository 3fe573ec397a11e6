"""Backends: which stages a target's artifact is made of. The target selects one.

- ``cpu``: a dynamic decoder for onnxruntime's CPU execution provider (MatMulNBits weights).
- ``npu``: static QDQ graphs and EPContext binaries for the Hexagon NPU (targets with ``npu:``).
"""

from edgepipe.backends.select import Backend, backend_for

__all__ = ["Backend", "backend_for"]
