"""Device runners: where an artifact is validated.

Every runner runs the same torch-free device entry point,
``python -m edgepipe.runtime validate ARTIFACT --json [--eval FILE] [--max-tokens N]``,
and returns its JSON, augmented with what the runner knows about the device and what the
figures can claim (``claims``). :class:`Runner` (:mod:`.base`) does everything but reaching the
device; each transport only provisions, copies and runs. A runner is chosen by a spec string:

- ``local``            the host CPU, in this process's Python (:mod:`.local`)
- ``qemu``             the aarch64 onnxruntime under qemu user-mode, CPU model from the target (:mod:`.qemu`)
- ``ssh://user@host[:port]``  a real board (:mod:`.ssh`)
"""

from edgepipe.devices.base import Claims, Runner
from edgepipe.devices.select import get_runner

__all__ = ["Claims", "Runner", "get_runner"]
