"""``edgepipe.pipeline``: what a build is asked for, what it returns, and the pipeline the target's
backend runs for it.

Nothing is printed here: progress goes to a callback. The steps themselves are stages
(``edgepipe.stage``: a frozen config in, a typed result out, cached); each backend
(``edgepipe.backends``) composes them for its kind of artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.progress import Progress, silent
from edgepipe.targets import Target, load_target


@dataclass(frozen=True)
class BuildRequest:
    """Everything a build was asked for, checked before any work (``build`` makes it)."""

    target: Target
    out: Path
    model: Path | None = None  # None: the embedded default model
    calib: Path | None = None
    eval_file: Path | None = None
    device: str | None = None  # also validate on a device runner (``edgepipe.devices``)
    allow_random_weights: bool = False  # an untrained model on purpose (tests, shape benchmarks): skip the reference gate


@dataclass(frozen=True)
class BuildResult:
    artifact: Path
    manifest: Manifest
    passed: bool
    failed_budgets: list[str] = field(default_factory=list)


def build(
    *,
    target: str | Target,
    out: Path | str,
    model: Path | str | None = None,
    calib: Path | str | None = None,
    eval_file: Path | str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    allow_random_weights: bool = False,
    bits_per_weight: float | None = None,
    max_mb: float | None = None,
    max_decode_time: float | None = None,
) -> BuildResult:
    """Build a verified artifact for ``target`` into ``out``. Raises EdgepipeError on bad input.

    The pipeline, as the target's backend runs it: check the inputs (texts, ``--out``, the model
    folder, the device spec), export, quantize, optimize, validate (accuracy, throughput, budgets),
    package (staged beside ``--out``, published atomically). A model whose fp32 reference is no
    better than a uniform guess is refused unless ``allow_random_weights`` (recorded in the manifest).
    ``bits_per_weight`` / ``max_mb`` replace the profile's size budget; ``max_decode_time`` adds a
    time budget within it (the profile's ``kernel_time``; :mod:`edgepipe.quantize.kernel_time`).
    """
    from edgepipe.backends import backend_for
    from edgepipe.cache import leases
    from edgepipe.package import check_out_dir

    request = _request(target, out, model, calib, eval_file, device, allow_random_weights, bits_per_weight, max_mb, max_decode_time)
    check_out_dir(request.out, (request.model, request.calib, request.eval_file))
    with leases():  # `cache prune` leaves every entry this build uses alone until it ends
        return backend_for(request.target).build(request, progress or silent)


def run_stages(
    *,
    target: str | Target,
    stop_after: str,
    model: Path | str | None = None,
    calib: Path | str | None = None,
    eval_file: Path | str | None = None,
    progress: Progress | None = None,
    allow_random_weights: bool = False,
    bits_per_weight: float | None = None,
    max_mb: float | None = None,
    max_decode_time: float | None = None,
) -> None:
    """The stages of :func:`build` up to ``stop_after`` (``export``, ``sensitivity``, ``quantize`` or
    ``validate``; CPU targets), into the stage cache only: a later build of the same inputs finds them
    there. ``edgepipe matrix`` runs each stage of a cell as its own task this way."""
    from edgepipe.backends.cpu import STAGES, CpuBackend
    from edgepipe.cache import leases

    if stop_after not in STAGES[:-1]:
        raise ValueError(f"stop_after is one of {STAGES[:-1]}, got {stop_after!r}")  # a bug, not user input
    request = _request(target, Path("unused"), model, calib, eval_file, None, allow_random_weights, bits_per_weight, max_mb, max_decode_time)
    if request.target.runtime.execution_provider != "CPUExecutionProvider":
        raise ValueError("run_stages runs the CPU backend's stages")  # a bug: the matrix runs NPU cells whole
    with leases():
        CpuBackend().run(request, progress or silent, stop_after)


def _request(
    target: str | Target, out: Path | str, model: Path | str | None, calib: Path | str | None, eval_file: Path | str | None,
    device: str | None, allow_random_weights: bool, bits_per_weight: float | None, max_mb: float | None,
    max_decode_time: float | None = None,
) -> BuildRequest:
    tgt = target if isinstance(target, Target) else load_target(target)
    if bits_per_weight is not None or max_mb is not None or max_decode_time is not None:
        tgt = with_budget(tgt, bits_per_weight, max_mb, max_decode_time)
    return BuildRequest(
        target=tgt,
        out=Path(out).absolute(),
        model=Path(model) if model is not None else None,
        calib=Path(calib) if calib is not None else None,
        eval_file=Path(eval_file) if eval_file is not None else None,
        device=device,
        allow_random_weights=allow_random_weights,
    )


def with_budget(target: Target, bits_per_weight: float | None, max_mb: float | None, max_decode_time: float | None = None) -> Target:
    """``target`` with its size budget replaced (one of the two) and/or its time budget set, checked as a
    profile's would be."""
    import dataclasses

    from edgepipe.errors import InputError
    from edgepipe.targets import parse_target

    if bits_per_weight is not None and max_mb is not None:
        raise InputError("give one size budget: --bits-per-weight or --max-mb, not both")
    if bits_per_weight is None and max_mb is None and max_decode_time is None:
        raise InputError("give a budget: --bits-per-weight, --max-mb or --max-decode-time")
    data = target.to_dict()
    data.pop("alias_of", None)
    if bits_per_weight is not None or max_mb is not None:
        data["quantization"].update(bits_per_weight=bits_per_weight, max_mb=max_mb)
    if max_decode_time is not None:
        data["quantization"]["max_decode_time"] = max_decode_time
    checked = parse_target(data, source=f"{target.name} with a size budget")
    return dataclasses.replace(checked, alias_of=target.alias_of)
