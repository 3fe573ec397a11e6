"""Validation of what a build made: accuracy against the fp32 reference, throughput, and the one
budget checker every backend uses. (What a device does with an artifact is ``edgepipe.runtime``;
validating on a remote device is ``edgepipe.devices``.)"""

from edgepipe.validate.budgets import Coverage, Measured, check_budgets, failed

__all__ = ["Coverage", "Measured", "check_budgets", "failed"]
