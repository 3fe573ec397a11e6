"""The pass manager: onnx-ir passes composed explicitly, each run once, in the order given.

A pass here is an ``onnx_ir.passes.PassBase`` (in practice an ``InPlacePass``) with a ``name``
class attribute, the key under which a build records what it did. onnx-ir's own
``Sequential`` / ``PassManager`` run the ``requires`` / ``ensures`` checks and name the failing pass,
but keep only a ``modified`` flag; a build also wants to know *what* each pass did (which input
it added, how many subgraphs it fused), so a pass may return a :class:`PassReport` (a
``PassResult`` with a ``details`` mapping) and :class:`PassManager` collects those by pass name.

:func:`apply_to_proto` runs a pass on an ``onnx.ModelProto`` in place, for callers that hold a
protobuf (the NPU encoder, the tests): the proto is only rewritten when the pass changed something,
so a pass that does not apply leaves it byte-identical. Tensors stay where they were: onnx-ir keeps
external-data references as references, so a decoder loaded without its weights is rewritten
without reading them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

__all__ = ["PassManager", "PassReport", "apply_to_proto", "pass_name"]


@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    """A ``PassResult`` that also says what the pass did (JSON-able; empty when it did nothing).

    Not frozen: it extends onnx-ir's (mutable) ``PassResult``, which every pass infrastructure
    check expects.
    """

    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def pass_name(pass_: ir.passes.PassBase) -> str:
    """The name a pass is recorded under: its ``name`` attribute, else its class name."""
    return getattr(pass_, "name", type(pass_).__name__)


class PassManager(ir.passes.Sequential):
    """Run ``passes`` once each, in order; report {pass name: details} for those that changed the model.

    An error in a pass (its ``requires`` / ``ensures`` checks included) is re-raised as onnx-ir's
    ``PassError`` naming the pass and the passes that ran before it, with the original as cause.
    """

    def __init__(self, passes: Sequence[ir.passes.PassBase]) -> None:
        super().__init__(*passes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(pass_name(p) for p in self.passes)

    def call(self, model: ir.Model) -> PassReport:
        done: dict[str, Any] = {}
        for i, pass_ in enumerate(self.passes):
            name = pass_name(pass_)
            try:
                result = pass_(model)
            except Exception as e:
                raise ir.passes.PassError(f"pass {name!r} failed (after {list(self.names[:i])}): {e}") from e
            model = result.model
            if result.modified:
                done[name] = dict(getattr(result, "details", {}))
                logger.info("pass %s: %s", name, done[name])
        return PassReport(model, bool(done), done)


def apply_to_proto(pass_: ir.passes.PassBase, model: onnx.ModelProto) -> PassReport:
    """Run ``pass_`` on ``model`` (changed in place, and only if the pass modified it); return its report.

    The report's ``model`` is the onnx-ir model the pass ran on; ``details`` is empty when the
    pass did not apply.
    """
    ir_model = ir.serde.deserialize_model(model)
    result = pass_(ir_model)
    if result.modified:
        model.CopyFrom(ir.serde.serialize_model(result.model))
    details = getattr(result, "details", {}) if result.modified else {}
    return PassReport(result.model, result.modified, details)
