"""Fuse the exact-GELU Erf decomposition into one ``Gelu`` node (ONNX opset 20), as onnxscript rewrite rules.

Why: the HTP rejects a quantized ``Erf``, so a QDQ model that keeps ``x * 0.5 * (1 + erf(x /
sqrt 2))`` as five ops either falls back to the CPU or cannot be compiled at all, while the
single ``Gelu`` op maps onto the HTP's own GELU kernel. torch's exporters at opset 20 already
emit ``Gelu``; older exports, other exporters and opset < 20 graphs carry the decomposition.

Matched forms (``a`` is ``x / sqrt2`` or ``x * (1/sqrt2)``): ``Mul(Mul(x, Add(Erf(a), 1)), 0.5)``
and ``Mul(Mul(x, 0.5), Add(Erf(a), 1))``; the rule set is commuted, so every Add / Mul takes its
inputs either way round. The constants may be initializers or ``Constant`` nodes of any single-element
shape, within 1e-3 of their value (exporters write sqrt 2 rounded). Every matched node but the last
must feed only the next one (onnxscript's matcher checks that the matched nodes are removable).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern

from edgepipe.optimize.manager import PassReport, apply_to_proto

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

__all__ = ["GELU_OPSET", "ErfGeluFusion", "erf_gelu_rules", "fuse_erf_gelu"]

GELU_OPSET = 20  # the first opset with Gelu
SQRT2 = math.sqrt(2.0)
_RTOL = 1e-3


def _erf_term(op, x, scale, one):
    """``Add(Erf(x / scale | x * scale), one)``; ``scale_op`` tells the check which one matched."""
    scaled = pattern.OrValue([op.Div(x, scale), op.Mul(x, scale)], tag_var="scale_op", tag_values=["Div", "Mul"])
    return op.Add(op.Erf(scaled), one)


def half_last(op, x, scale, one, half):
    """``Mul(Mul(x, Add(Erf(a), 1)), 0.5)``"""
    return op.Mul(op.Mul(x, _erf_term(op, x, scale, one)), half)


def half_first(op, x, scale, one, half):
    """``Mul(Mul(x, 0.5), Add(Erf(a), 1))``"""
    return op.Mul(op.Mul(x, half), _erf_term(op, x, scale, one))


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a single-element constant (an initializer or a ``Constant`` node's output), else None."""
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _close(value: ir.Value | None, expected: float) -> bool:
    got = _scalar(value)
    return got is not None and math.isclose(got, expected, rel_tol=_RTOL)


def is_exact_gelu(context, x: ir.Value, scale: ir.Value, one: ir.Value, half: ir.Value, scale_op: str) -> pattern.MatchResult:
    """The constants make it GELU: ``x / sqrt2`` (or ``x * 1/sqrt2``), ``+ 1``, ``* 0.5``."""
    del context, x
    result = pattern.MatchResult()
    if not _close(scale, SQRT2 if scale_op == "Div" else 1.0 / SQRT2):
        return result.fail(f"the Erf input is not x {scale_op} {'sqrt 2' if scale_op == 'Div' else '1/sqrt 2'}", scale)
    if not _close(one, 1.0):
        return result.fail("Erf is not followed by + 1", one)
    if not _close(half, 0.5):
        return result.fail("the product is not halved", half)
    return result


def gelu(op, x: ir.Value, **_: object) -> ir.Value:
    """The replacement: one exact ``Gelu`` (needs opset >= 20, see :class:`ErfGeluFusion`)."""
    return op.Gelu(x, approximate="none")


def erf_gelu_rules() -> pattern.RewriteRuleSet:
    """Both forms, each commuted over its Add / Mul inputs."""
    rules = [pattern.RewriteRule(p, gelu, is_exact_gelu, name=f"erf_gelu_{p.__name__}") for p in (half_last, half_first)]
    return pattern.RewriteRuleSet(rules, commute=True)


def default_opset(imports: Mapping[str, int]) -> int:
    """The default-domain version of an opset-import map (``ir.Model.opset_imports``)."""
    return imports.get("", imports.get("ai.onnx", 0))


class ErfGeluFusion(ir.passes.InPlacePass):
    """Replace each Erf-GELU subgraph by ``Gelu(approximate="none")``.

    Needs: default opset >= 20 (``Gelu`` does not exist before; :func:`fuse_erf_gelu` converts the
    model first). Changes: the matched nodes become one ``Gelu`` each; after a fusion, nodes and
    initializers nothing uses any more (the sqrt 2 / 1 / 0.5 constants) are removed, as onnxscript's
    own ``rewrite()`` does. Reports ``{"count": fused subgraphs}``.
    """

    name: ClassVar[str] = "erf_gelu_fusion"

    def requires(self, model: ir.Model) -> None:
        if default_opset(model.opset_imports) < GELU_OPSET:
            raise ir.passes.PreconditionError(f"Gelu needs opset {GELU_OPSET}; the model imports opset {default_opset(model.opset_imports)}")

    def call(self, model: ir.Model) -> PassReport:
        count = erf_gelu_rules().apply_to_model(model)
        if count:
            # the matcher leaves the constants in place for a later clean-up: this is it
            common_passes.RemoveUnusedNodesPass()(model)
            logger.info("fused %d Erf-GELU subgraphs into Gelu", count)
        return PassReport(model, bool(count), {"count": count})


def fuse_erf_gelu(model: onnx.ModelProto) -> int:
    """Replace each Erf-GELU subgraph of ``model`` (changed in place) by ``Gelu``; return the count.

    A graph with an Erf whose default opset is below 20 is first converted to opset 20 (by onnx's
    version converter), because ``Gelu`` does not exist in earlier opsets.
    """
    if not any(n.op_type == "Erf" for n in model.graph.node):
        return 0
    if default_opset({o.domain: o.version for o in model.opset_import}) < GELU_OPSET:
        from onnx import version_converter

        model.CopyFrom(version_converter.convert_version(model, GELU_OPSET))
    return int(apply_to_proto(ErfGeluFusion(), model).details.get("count", 0))
