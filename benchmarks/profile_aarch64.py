"""Which onnxruntime kernels a Raspberry Pi 5 (Cortex-A76: asimd, dotprod, fp16; no i8mm, no SVE) runs
for the artifacts' ``MatMulNBits``, told by emulation (which kernels, not their speed).

    python benchmarks/profile_aarch64.py --int4 DIR --int8 DIR [--cpus cortex-a76,max]

Each (artifact, CPU model, workload) runs in the aarch64 guest that ``validate --device qemu``
uses (``edgepipe.devices.qemu_env``): the runtime's ``CausalLM`` on one thread, either three
one-token decode steps (M = 1) or one 8-token prefill (M = 8). qemu-user logs every block it
translates (``QEMU_LOG=in_asm``); the guest prints where onnxruntime's library is mapped and calls
``getppid`` (through ctypes) right before the workload, so the blocks translated after that call are
code the workload ran for the first time. The wheel is stripped: blocks are gathered into functions
by the library's unwind records (``readelf --debug-dump=frames``) and each function is described by
the vector instructions it ran, told by their encodings (``sdot``/``udot`` = dotprod, ``usdot``/
``smmla`` = i8mm, ``fmla .8h`` = fp16, SVE), since qemu's disassembler prints some as ``.byte``. Which MLAS routine that is follows from MLAS's ARM64
dispatch (see ``benchmarks/RESULTS.md``). ``-cpu max`` (i8mm, SVE) is the contrast, not a board.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as python benchmarks/profile_aarch64.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.profile_parse import fde_ranges, function_of

GUEST = r"""
import ctypes, json, sys, numpy as np
from edgepipe.runtime.model import CausalLM
art, kind = sys.argv[1], sys.argv[2]
lm = CausalLM(art, threads=1)
state = lm.stepper(16)
libc = ctypes.CDLL(None)
marker = ctypes.cast(libc.getppid, ctypes.c_void_p).value
maps = [ln.split() for ln in open("/proc/self/maps") if "onnxruntime_pybind11_state" in ln]
features = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("Features")), [])
libc.getppid()
if kind == "decode":
    for _ in range(3):
        state.step(np.array([5]), last_only=True)
else:
    state.step(np.arange(1, 9), last_only=True)
print(json.dumps({"marker": marker, "maps": maps, "features": features}))
"""

# vector instruction classes by encoding (qemu's disassembler prints the dot-product and matrix
# instructions as ``.byte``): (mask, value, class), checked in this order
ENCODINGS: tuple[tuple[int, int, str], ...] = (
    (0xFFE0FC00, 0x4E80A400, "i8mm smmla"),
    (0xFFE0FC00, 0x6E80A400, "i8mm ummla"),
    (0xFFE0FC00, 0x4E80AC00, "i8mm usmmla"),
    (0xBFE0FC00, 0x0E809C00, "i8mm usdot"),
    (0xBFC0F400, 0x0F80F000, "i8mm usdot (element)"),
    (0xBFC0F400, 0x0F00F000, "i8mm sudot (element)"),
    (0xBFE0FC00, 0x0E809400, "dotprod sdot"),
    (0xBFC0F400, 0x0F80E000, "dotprod sdot (element)"),
    (0xBFE0FC00, 0x2E809400, "dotprod udot"),
    (0xBFC0F400, 0x2F80E000, "dotprod udot (element)"),
    (0xFFE0FC00, 0x6E40EC00, "bf16 bfmmla"),
    (0xBFE0FC00, 0x2E40FC00, "bf16 bfdot"),
    (0xBFE0FC00, 0x0E400C00, "fp16 fmla .8h"),
    (0xBFC0F400, 0x0F001000, "fp16 fmla .8h (element)"),
    (0xBFA0FC00, 0x0E20CC00, "fp32 fmla .4s"),
    (0xBF80F400, 0x0F801000, "fp32 fmla .4s (element)"),
    (0x9E000000, 0x04000000, "SVE"),  # op0 = 0b0010 (bits 28:25)
    (0xBF20FC00, 0x0E20C000, "int8 smull (no dotprod)"),
    (0xBF20FC00, 0x2E20C000, "int8 umull (no dotprod)"),
)
_INSN = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{8})\b")


@dataclass(frozen=True)
class Block:
    addr: int  # guest address of the block's first instruction
    words: tuple[int, ...]  # the instruction encodings


def parse_in_asm(text: str) -> list[Block]:
    """The translated blocks of a ``-d in_asm`` log, in translation order."""
    blocks: list[Block] = []
    cur: list[tuple[int, int]] = []
    for line in text.splitlines():
        if line.startswith("IN:"):
            if cur:
                blocks.append(Block(cur[0][0], tuple(w for _, w in cur)))
            cur = []
            continue
        m = _INSN.match(line)
        if m:
            cur.append((int(m[1], 16), int(m[2], 16)))
    if cur:
        blocks.append(Block(cur[0][0], tuple(w for _, w in cur)))
    return blocks


def insn_class(word: int) -> str | None:
    return next((cls for mask, value, cls in ENCODINGS if word & mask == value), None)


def insn_classes(words: tuple[int, ...] | list[int]) -> Counter[str]:
    return Counter(c for c in map(insn_class, words) if c)


def after_marker(blocks: list[Block], marker: int) -> list[Block]:
    """The blocks translated after the first one at ``marker`` (all blocks if it never appears)."""
    for i, b in enumerate(blocks):
        if b.addr == marker:
            return blocks[i + 1 :]
    return blocks


def library_offsets(maps: list[list[str]]) -> list[tuple[int, int, int]]:
    """``(start, end, file offset)`` of each executable mapping of the library (from /proc/self/maps)."""
    out = []
    for fields in maps:
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if "x" in fields[1]:
            out.append((lo, hi, int(fields[2], 16)))
    return out


def kernel_functions(
    blocks: list[Block], maps: list[list[str]], ranges: list[tuple[int, int]]
) -> dict[tuple[int, int], Counter[str]]:
    """Functions of the library (file offsets) whose translated blocks ran vector instructions of
    :data:`INSN_CLASSES`, with the count of each class (a block not in any function: its own 64-byte range)."""
    segs = library_offsets(maps)
    found: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for b in blocks:
        seg = next(((lo, off) for lo, hi, off in segs if lo <= b.addr < hi), None)
        classes = insn_classes(b.words)
        if seg is None or not classes:
            continue
        offset = b.addr - seg[0] + seg[1]
        func = function_of(ranges, offset) or (offset & ~63, (offset & ~63) + 64)
        found[func].update(classes)
    return dict(found)


def run_guest_case(art: Path, cpu: str, kind: str, log: Path) -> dict:
    from edgepipe.devices import qemu_env
    from edgepipe.devices.qemu import QemuRunner

    env = QemuRunner("cortex-a76").ensure_env()
    extra = {"QEMU_LOG": "in_asm", "QEMU_LOG_FILENAME": str(log)}
    proc = qemu_env.run_guest(env, cpu, ["-c", GUEST, str(art), kind], timeout=3600, extra_env=extra)
    if proc.returncode:
        raise RuntimeError(f"guest failed ({cpu}, {kind}): {proc.stderr[-500:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    lib = Path(info["maps"][0][-1])
    frames = subprocess.run(["readelf", "--debug-dump=frames", str(lib)], capture_output=True, text=True).stdout
    blocks = after_marker(parse_in_asm(log.read_text(errors="replace")), int(info["marker"]))
    info["kernels"] = kernel_functions(blocks, info["maps"], fde_ranges(frames))
    return info


def report(results: dict[tuple[str, str, str], dict]) -> list[str]:
    lines = ["| artifact | -cpu | workload | guest Features (relevant) | functions with vector code | instruction classes run (instructions in translated blocks) |",
             "|---|---|---|---|---:|---|"]
    for (label, cpu, kind), info in results.items():
        feats = " ".join(f for f in info["features"] if f in ("asimd", "asimddp", "fphp", "asimdhp", "i8mm", "sve", "sve2", "bf16", "sme"))
        total: Counter[str] = Counter()
        for c in info["kernels"].values():
            total.update(c)
        classes = ", ".join(f"{k} {v}" for k, v in total.most_common())
        lines.append(f"| {label} | {cpu} | {kind} | {feats} | {len(info['kernels'])} | {classes} |")
    lines += ["", "Functions (file offset, size) and what they ran:", ""]
    for (label, cpu, kind), info in results.items():
        funcs = sorted(info["kernels"].items(), key=lambda kv: -sum(kv[1].values()))[:8]
        desc = "; ".join(f"0x{a:x}+{b - a}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()) for (a, b), c in funcs)
        lines.append(f"- {label} / {cpu} / {kind}: {desc}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--int4", type=Path, required=True)
    p.add_argument("--int8", type=Path, required=True)
    p.add_argument("--cpus", default="cortex-a76,max")
    p.add_argument("--workloads", default="decode,prefill")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="profile_aarch64-") as t:
        for label, art in (("int4", args.int4), ("int8", args.int8)):
            for cpu in args.cpus.split(","):
                for kind in args.workloads.split(","):
                    print(f"guest: {label} {cpu} {kind}", file=sys.stderr, flush=True)
                    log = Path(t) / f"{label}-{cpu}-{kind}.log"
                    results[(label, cpu, kind)] = run_guest_case(art, cpu, kind, log)
                    log.unlink()
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
