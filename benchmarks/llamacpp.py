"""A cached CPU build of llama.cpp, taken from the ``llama-cpp-python`` sdist on PyPI.

The sdist vendors llama.cpp under ``vendor/llama.cpp`` (sources, ``convert_hf_to_gguf.py``,
``gguf-py``). We build only the command-line tools the benchmark needs, once, into
``$EDGEPIPE_CACHE/llamacpp/<version>/`` (or ``~/.cache/edgepipe/llamacpp/<version>/``)::

    from benchmarks.llamacpp import ensure_llamacpp
    paths = ensure_llamacpp(print)
    subprocess.run([paths.quantize, "in.gguf", "out.gguf", "Q4_0"])

The build is not "native": ``-DGGML_NATIVE=ON`` turns on the AMX kernels on Sapphire Rapids class
CPUs, which crash on quantized models here. Instead each x86 instruction-set option is set ON or
OFF from the host's ``/proc/cpuinfo`` flags (:func:`benchmarks.isa.isa_flags`; AMX always off): a build pinned to
AVX-512 died with SIGILL on an AVX2-only EPYC. The chosen set names the cache folder
(``<version>-<isa>``) and is checked against the build's marker, so a build for another
instruction set is never reused.

Run ``python benchmarks/llamacpp.py`` to build (or just print the paths of) the cached tools.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as python benchmarks/llamacpp.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.isa import host_isa, isa_cmake_flags, isa_of_cmake_flags, isa_tag  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# the converter imports sentencepiece before it looks for a tokenizer.model (llama.cpp's
# requirements-convert pins sentencepiece>=0.1.98,<0.3.0); kept out of the host environment
CONVERT_PYDEPS = ("sentencepiece==0.2.1",)
TARGETS = ("llama-quantize", "llama-bench", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_OPENMP=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)
Progress = Callable[[str], None]

# llama.cpp's converter names a BPE pre-tokenizer by the hash of the token ids it gives for a test
# string (``get_vocab_base_pre``), so a model with its own vocabulary (benchmarks/train_austen.py) is
# never recognised and the converter raises. A tokenizer.json whose only pre-tokenizer is ByteLevel
# with GPT-2's regex (``use_regex``) and no normalizer splits text exactly as llama.cpp's ``gpt-2``
# pre-tokenizer does: only then, and only when the hash is unknown, the shim answers ``gpt-2``.
CONVERT_SHIM = r"""
import json, runpy, sys
from pathlib import Path
convert = sys.argv.pop(1)
sys.path.insert(0, str(Path(convert).parent))
from conversion import base
def _byte_level_gpt2(model_dir):
    try:
        tj = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return (tj.get("model") or {}).get("type") == "BPE" and tj.get("normalizer") is None and pre.get("type") == "ByteLevel" \
        and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
_known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _known(self, tokenizer)
    except NotImplementedError:
        if _byte_level_gpt2(self.dir_model):
            print("convert shim: unknown BPE pre-tokenizer hash; a plain byte-level BPE, declared gpt-2", file=sys.stderr)
            return "gpt-2"
        raise
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = convert
runpy.run_path(convert, run_name="__main__")
"""


@dataclass(frozen=True)
class Paths:
    root: Path  # $cache/llamacpp/<version>
    src: Path  # the vendored llama.cpp tree
    bin: Path
    quantize: Path
    bench: Path
    perplexity: Path
    convert: Path  # convert_hf_to_gguf.py
    gguf_py: Path  # the vendored gguf package, to put first on PYTHONPATH for the converter
    pydeps: Path  # the converter's own Python needs that the host may lack (sentencepiece), pip --target
    version: str
    commit: str  # llama.cpp build number / commit as the tools report it, if known

    def convert_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.gguf_py), str(self.pydeps), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        return env

    def convert_cmd(self, model_dir: Path, out: Path, outtype: str = "f32") -> list[str]:
        """The host python runs the vendored converter (use with ``env=self.convert_env()``), through
        :data:`CONVERT_SHIM`: a plain byte-level BPE whose pre-tokenizer hash it does not know is
        declared ``gpt-2`` to it (the same regex) instead of refused."""
        return [
            sys.executable,
            "-c",
            CONVERT_SHIM,
            str(self.convert),
            str(model_dir),
            "--outtype",
            outtype,
            "--outfile",
            str(out),
        ]


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION, isa: frozenset[str] | None = None) -> Path:
    """``$EDGEPIPE_LLAMACPP`` if set (a build folder of its own), else
    ``<edgepipe cache>/llamacpp/<version>-<isa tag>`` (default: the host's instruction set)."""
    if os.environ.get("EDGEPIPE_LLAMACPP"):
        return Path(os.environ["EDGEPIPE_LLAMACPP"])
    return _cache_base() / f"{version}-{isa_tag(host_isa() if isa is None else isa)}"


def _cache_base() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE") or Path.home() / ".cache" / "edgepipe") / "llamacpp"


def _candidates(version: str, isa: frozenset[str]) -> list[Path]:
    """Where a build for ``isa`` may be: its own folder, then the folder of builds made before the
    instruction set named the folder (used only when its marker's flags give the same set)."""
    own = cache_dir(version, isa)
    return [own] if os.environ.get("EDGEPIPE_LLAMACPP") else [own, _cache_base() / version]


def marker_isa(info: dict) -> frozenset[str] | None:
    """The instruction set a build's ``.complete`` marker records (None: no flags recorded)."""
    flags = info.get("cmake_flags")
    return isa_of_cmake_flags(flags) if isinstance(flags, list) else None


def _paths(root: Path, version: str, commit: str = "") -> Paths:
    src = root / "src" / "vendor" / "llama.cpp"
    bin_ = root / "build" / "bin"
    return Paths(
        root=root,
        src=src,
        bin=bin_,
        quantize=bin_ / "llama-quantize",
        bench=bin_ / "llama-bench",
        perplexity=bin_ / "llama-perplexity",
        convert=src / "convert_hf_to_gguf.py",
        gguf_py=src / "gguf-py",
        pydeps=root / "pydeps",
        version=version,
        commit=commit,
    )


def cached_llamacpp(
    version: str = LLAMA_CPP_PYTHON_VERSION, root: Path | None = None, isa: frozenset[str] | None = None
) -> Paths | None:
    """The cached build for ``isa`` (default: the host's) in ``root`` (default: :func:`cache_dir`,
    then the older ``llamacpp/<version>`` folder) if it is complete, else None (never builds).
    A build whose recorded flags give another instruction set is not this one."""
    isa = host_isa() if isa is None else isa
    for where in [Path(root)] if root else _candidates(version, isa):
        found = _complete_build(where, version, isa)
        if found:
            return found
    return None


def _complete_build(root: Path, version: str, isa: frozenset[str]) -> Paths | None:
    marker = root / ".complete"
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return None
    if marker_isa(info) != isa:
        return None
    p = _paths(root, version, info.get("commit") or _tool_version(root / "build" / "bin" / "llama-bench"))
    if (
        all(x.is_file() for x in (p.quantize, p.bench, p.perplexity, p.convert))
        and (p.pydeps / ".complete").is_file()
    ):
        return p
    return None


def _ensure_pydeps(p: Paths, log, say: Progress) -> None:
    if (p.pydeps / ".complete").is_file():
        return
    say(f"llama.cpp: installing the converter's Python needs ({', '.join(CONVERT_PYDEPS)}) into {p.pydeps}")
    shutil.rmtree(p.pydeps, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", p.pydeps, *CONVERT_PYDEPS], log)
    (p.pydeps / ".complete").write_text("\n".join(CONVERT_PYDEPS))


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}; see {log.name}")


def ensure_llamacpp(
    progress: Progress | None = None, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2, isa: frozenset[str] | None = None
) -> Paths:
    """Return the cached llama.cpp tools for ``isa`` (default: the host's instruction set),
    downloading the sdist and building them first if needed."""
    say = progress or (lambda _m: None)
    isa = host_isa() if isa is None else isa
    found = cached_llamacpp(version, isa=isa)
    if found:
        return found
    root = cache_dir(version, isa)
    flags = (*CMAKE_FLAGS, *isa_cmake_flags(isa))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits for the first build
        found = cached_llamacpp(version, isa=isa)
        if found:
            return found
        marker = root / ".complete"
        if marker.is_file() and marker_isa(json.loads(marker.read_text())) == isa:
            # tools built, only the converter's Python needs are missing
            p = _paths(root, version, json.loads(marker.read_text()).get("commit", ""))
            with open(root / "pydeps.log", "w") as log:
                _ensure_pydeps(p, log, say)
            return p
        marker.unlink(missing_ok=True)  # a build for another instruction set is rebuilt
        for name in ("src", "build"):
            shutil.rmtree(root / name, ignore_errors=True)
        t0 = time.time()
        with open(root / "build.log", "w") as log:
            say(f"llama.cpp: downloading the llama-cpp-python {version} sdist")
            with tempfile.TemporaryDirectory() as dl:
                # only this package as source: `--no-binary :all:` would also build every build
                # dependency (scikit-build-core, setuptools, ...) from source, recursively
                _run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--no-binary",
                        "llama-cpp-python",
                        "-d",
                        dl,
                        f"llama-cpp-python=={version}",
                    ],
                    log,
                )
                sdists = list(Path(dl).glob("llama_cpp_python-*.tar.gz")) + list(
                    Path(dl).glob("llama-cpp-python-*.tar.gz")
                )
                if not sdists:
                    raise RuntimeError(f"no sdist downloaded into {dl}: {os.listdir(dl)}")
                with tarfile.open(sdists[0]) as tf:
                    tmp = Path(tempfile.mkdtemp(prefix=".tmp-src-", dir=root))
                    tf.extractall(tmp, filter="data")
                top = next(tmp.iterdir())
                os.replace(top, root / "src")
                shutil.rmtree(tmp, ignore_errors=True)
            p = _paths(root, version)
            if not (p.src / "CMakeLists.txt").is_file():
                raise RuntimeError(f"{p.src} has no CMakeLists.txt: not the expected sdist layout")
            say(f"llama.cpp: configuring ({' '.join(flags)})")
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", p.src, "-B", root / "build", *gen, *flags], log)
            say(f"llama.cpp: building {', '.join(TARGETS)} with -j{jobs} (several minutes on 2 cores)")
            _run(
                [
                    "cmake",
                    "--build",
                    root / "build",
                    "--config",
                    "Release",
                    f"-j{jobs}",
                    "--target",
                    *TARGETS,
                ],
                log,
            )
            _ensure_pydeps(p, log, say)
        commit = _tool_version(p.bench)
        seconds = time.time() - t0
        (root / ".complete").write_text(
            json.dumps(
                {
                    "version": version,
                    "commit": commit,
                    "build_seconds": round(seconds, 1),
                    "cmake_flags": list(flags),
                    "isa": sorted(isa),
                    "targets": list(TARGETS),
                    "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                indent=2,
            )
        )
        say(f"llama.cpp: built in {seconds:.0f} s into {root}")
        return _paths(root, version, commit)


def build_info(root: Path) -> dict:
    """The ``.complete`` marker of the build in ``root`` (a :class:`Paths`' ``root``)."""
    marker = Path(root) / ".complete"
    return json.loads(marker.read_text()) if marker.is_file() else {}


def _tool_version(exe: Path) -> str:
    """llama.cpp's version line, e.g. '0.5.0-dev (build 1, commit 0c1e570)', as ``--version`` prints it."""
    try:
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in (r.stdout + r.stderr).splitlines():
        if line.lower().startswith("version:"):
            return line.split(":", 1)[1].strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    paths = ensure_llamacpp(lambda m: print(m, flush=True))
    print(json.dumps({k: str(v) for k, v in asdict(paths).items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
