"""Qualcomm Hexagon NPU (HTP) stages through onnxruntime-qnn: QDQ graphs and EPContext binaries.

``decoder`` and ``encoder`` hold each kind's cached stages, ``compile`` the coverage check and
EPContext compile both share (over ``qnn``), ``data`` the encoder's default texts. The backend
``edgepipe.backends.npu`` composes them. Heavy imports (torch, onnxruntime-qnn) happen inside the
functions, so importing this package costs nothing on a machine without them.
"""
