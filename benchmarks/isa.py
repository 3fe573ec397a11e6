"""The x86 instruction set a benchmark runs with: the host's flags, llama.cpp's build options for
them, and a mask that makes an AVX-512 host run as an AVX2-only CPU.

llama.cpp is compiled for an instruction set (``benchmarks/llamacpp.py`` builds with the options
:func:`isa_flags` gives for the host's ``/proc/cpuinfo`` flags). onnxruntime's MLAS and numpy choose
their kernels at run time from the ``cpuid`` instruction.

Issue 16 asks for the speed figures on both x86 kinds, and the machines here are AVX-512 Xeons.
Linux can make ``cpuid`` fault in user space (``arch_prctl(ARCH_SET_CPUID, 0)``, "CPUID faulting",
flag ``cpuid_fault``). A small preloaded library (:data:`MASK_C`) turns that on and answers each
faulting ``cpuid`` with the real one minus AVX-512 (F, DQ, IFMA, CD, BW, VL, VBMI, VBMI2, VNNI,
BITALG, VPOPCNTDQ, FP16, BF16), AVX-VNNI and AMX, which is what an AVX2-only EPYC (Zen 2/3) reports.
A process then runs the same AVX2 kernels it would run on such a machine, on this host's caches and
memory: a figure measured so says which *kernels* win on AVX2, not what an EPYC's memory system
would give.

The setting is per thread and inherited by threads created later, so it covers onnxruntime's and
OpenMP's pools. glibc picks its string functions before the library loads (they may still use
AVX-512; so do llama.cpp's, and both sides of a comparison get the same). Checked, not assumed:
:func:`check` runs numpy under the mask and requires that it finds AVX2 and not AVX512F.

    python benchmarks/isa.py            # build the mask library and check it
    LD_PRELOAD=$(python benchmarks/isa.py --path) python -m edgepipe.runtime bench DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if not __package__:  # run as python benchmarks/isa.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_common import compiled  # noqa: E402

# ggml's x86 options and the /proc/cpuinfo flags each needs (ggml's AVX512 compiles with
# -mavx512f/cd/vl/dq/bw). AVX512_VBMI and AVX512_BF16 stay off: the quants compared (Q4_0, Q4_K_M,
# Q8_0) do not use them, and an AVX-512 build stays the same on every AVX-512 VNNI host.
ISA_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SSE42", ("sse4_2",)),
    ("AVX", ("avx",)),
    ("AVX2", ("avx2",)),
    ("BMI2", ("bmi2",)),
    ("FMA", ("fma",)),
    ("F16C", ("f16c",)),
    ("AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("AVX512_VNNI", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni")),
    ("AVX_VNNI", ("avx2", "avx_vnni")),
)
# ggml's defaults with GGML_NATIVE=OFF, for markers whose flags do not name an option
ISA_DEFAULT_ON = frozenset({"SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C"})
# the host flags vs_llamacpp prints with its tables
RELEVANT_CPU_FLAGS = ("sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
                      "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (or in the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def isa_flags(flags: frozenset[str] | set[str]) -> frozenset[str]:
    """The ggml x86 options to build with on a CPU with these flags. AVX_VNNI only without
    AVX512_VNNI (the AVX-512 kernels take precedence)."""
    on = {name for name, needs in ISA_OPTIONS if set(needs) <= set(flags)}
    if "AVX512_VNNI" in on:
        on.discard("AVX_VNNI")
    return frozenset(on)


def isa_cmake_flags(isa: frozenset[str]) -> tuple[str, ...]:
    """Every ISA option ON or OFF explicitly (with NATIVE off, ggml turns AVX2 and friends on by default)."""
    return tuple(f"-DGGML_{name}={'ON' if name in isa else 'OFF'}" for name, _ in ISA_OPTIONS)


def isa_of_cmake_flags(flags: list[str] | tuple[str, ...]) -> frozenset[str]:
    """The ISA options a build's recorded cmake flags turned on (ggml's defaults for the others)."""
    on = set(ISA_DEFAULT_ON)
    for flag in flags:
        name, _, value = flag.removeprefix("-DGGML_").partition("=")
        if flag.startswith("-DGGML_") and name in dict(ISA_OPTIONS):
            (on.add if value.upper() == "ON" else on.discard)(name)
    return frozenset(on)


def isa_tag(isa: frozenset[str]) -> str:
    """A short name of the instruction set, for the cache folder."""
    for name, tag in (("AVX512_VNNI", "avx512vnni"), ("AVX512", "avx512"), ("AVX_VNNI", "avxvnni"), ("AVX2", "avx2"), ("AVX", "avx")):
        if name in isa:
            return tag
    return "generic"


def host_isa() -> frozenset[str]:
    return isa_flags(cpu_flags())


MASK_C = r"""
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static long set_cpuid(unsigned long on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

/* cpuid (0F A2) faulted: run it with faulting briefly off, hide the AVX-512 / AVX-VNNI / AMX bits */
static void on_segv(int sig, siginfo_t *si, void *uc) {
    greg_t *r = ((ucontext_t *)uc)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    unsigned a, b, c, d, leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX];
    (void)sig; (void)si;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { signal(SIGSEGV, SIG_DFL); return; }  /* a real crash */
    set_cpuid(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        b &= ~(1u << 16 | 1u << 17 | 1u << 21 | 1u << 26 | 1u << 27 | 1u << 28 | 1u << 30 | 1u << 31);
        c &= ~(1u << 1 | 1u << 6 | 1u << 11 | 1u << 12 | 1u << 14);
        d &= ~(1u << 2 | 1u << 3 | 1u << 8 | 1u << 22 | 1u << 23 | 1u << 24 | 1u << 25);
    } else if (leaf == 7 && sub == 1) {
        a &= ~(1u << 4 | 1u << 5 | 1u << 21 | 1u << 23);
    }
    r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    set_cpuid(0);
}
"""

# /proc/cpuinfo flags the library hides (for the benchmark's printed machine facts and for
# choosing llama.cpp's build options as an AVX2-only host would)
HIDDEN_FLAGS = frozenset(
    {
        "avx512f", "avx512dq", "avx512ifma", "avx512cd", "avx512bw", "avx512vl", "avx512vbmi",
        "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_fp16",
        "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "avx512_vp2intersect",
    }
)  # fmt: skip

ISAS = ("host", "avx2")


class MaskUnavailable(RuntimeError):
    """CPUID masking cannot work here (no CPUID faulting, not x86-64, or no C compiler)."""


def masked_flags(flags: frozenset[str], isa: str) -> frozenset[str]:
    """The cpuinfo flags a program sees under the mask for ``isa`` ("host": unchanged)."""
    return flags if isa == "host" else flags - HIDDEN_FLAGS


def library(cache: Path | None = None) -> Path:
    """The compiled library (built once per source text into the cache)."""
    from edgepipe.models import cache_root

    root = Path(cache) if cache else cache_root() / "isa_mask"
    if "cpuid_fault" not in cpu_flags():
        raise MaskUnavailable("this CPU / hypervisor has no CPUID faulting (flag cpuid_fault): AVX2 cannot be emulated here")
    try:
        return compiled(MASK_C, root, "avx2", ["-O2", "-shared", "-fPIC"], suffix=".so")
    except (RuntimeError, OSError) as e:
        raise MaskUnavailable(f"compiling the CPUID mask failed: {str(e)[-400:]}") from None


def env_for(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment that runs a child process with ``isa``'s instruction set (a copy of ``base``)."""
    env = dict(os.environ if base is None else base)
    if isa == "host":
        return env
    if isa != "avx2":
        raise ValueError(f"isa must be one of {ISAS}: {isa!r}")
    so = str(library())
    env["LD_PRELOAD"] = ":".join(p for p in (so, env.get("LD_PRELOAD", "")) if p)
    return env


CHECK_CODE = (
    "import json, numpy; f = numpy._core._multiarray_umath.__cpu_features__; "
    "print(json.dumps({k: bool(f.get(k)) for k in ('AVX2', 'FMA3', 'AVX512F', 'AVX512_SKX')}))"
)


def check(isa: str = "avx2") -> dict[str, bool]:
    """What numpy finds in a child process under the mask; raises if the mask did not take."""
    out = subprocess.run([sys.executable, "-c", CHECK_CODE], capture_output=True, text=True, env=env_for(isa), check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if isa == "avx2" and (found["AVX512F"] or not found["AVX2"]):
        raise MaskUnavailable(f"the CPUID mask did not take: numpy found {found}")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", action="store_true", help="print only the library's path")
    args = p.parse_args(argv)
    if args.path:
        print(library())
        return 0
    print(f"library: {library()}")
    print(f"numpy under the mask finds: {check('avx2')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
