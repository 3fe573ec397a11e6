"""Target profiles: data (``targets/<name>.yaml``) validated by a frozen schema."""

from edgepipe.targets.loader import list_targets, load_target, parse_target, targets_dir
from edgepipe.targets.schema import SCHEMA_VERSION, Budgets, Cpu, Npu, Quantization, RuntimeOptions, Target

__all__ = [
    "SCHEMA_VERSION",
    "Budgets",
    "Cpu",
    "Npu",
    "Quantization",
    "RuntimeOptions",
    "Target",
    "list_targets",
    "load_target",
    "parse_target",
    "targets_dir",
]
