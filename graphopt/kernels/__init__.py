"""graphopt's own C++ kernels: built for this CPU on first use, cached, loaded into torch.

Each library is one C++ file beside this one that registers CPU kernels for ops graphopt
defines in Python (`torch.library`), so PyTorch, inductor's generated code and graphopt's
fallback partitions all call them through the dispatcher with no Python in between. The build
is `$CXX` (default g++) with -O3 -march=native -fopenmp against the installed torch: the code
is vectorized for the CPU it runs on. Builds are cached in `$GRAPHOPT_KERNEL_DIR` (default
~/.cache/graphopt/kernels), keyed by the source, torch's version, the compiler and the CPU's
flags; several processes building at once take turns through a file lock, and a library is
moved into place only once complete. Without a compiler the ops keep their reference
implementation (PyTorch ops, slower), with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("graphopt")
HERE = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w")


def kernel_dir() -> Path:
    configured = os.environ.get("GRAPHOPT_KERNEL_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "graphopt" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _key(source: Path, cxx: str) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for part in (torch.__version__, cxx, " ".join(FLAGS), _cpu_flags(), sys.version):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _compile(source: Path, target: Path, cxx: str) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(source), "-o", str(target)]
    cmd += [f"-I{p}" for p in include_paths()]
    for path in library_paths():
        cmd += [f"-L{path}", f"-Wl,-rpath,{path}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{done.stderr[-3000:]}")


@functools.cache
def load(name: str) -> bool:
    """Build (if not cached) and load kernel library `name` (`<name>.cpp` here) into torch.

    Returns False, after one warning, when it cannot be built here (no compiler, or the
    compile failed): the ops then run their reference implementation.
    """
    import fcntl

    source = HERE / f"{name}.cpp"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        log.warning("graphopt: no C++ compiler (%s): %s kernels run as PyTorch ops", cxx, name)
        return False
    folder = kernel_dir()
    library = folder / f"{name}-{_key(source, cxx)}.so"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not library.exists():
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    partial = Path(tmp) / library.name
                    _compile(source, partial, cxx)
                    partial.replace(library)
                log.info("graphopt: built %s in %.1f s", library, time.perf_counter() - start)
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as err:
        log.warning("graphopt: %s kernels not built (%s); they run as PyTorch ops", name, err)
        return False
    return True
