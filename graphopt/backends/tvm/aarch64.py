"""Export TVM libraries for target="aarch64" and run them on x86 under qemu, to prove they work.

    missing_tools()                   -> what is not installed, each with its Debian package
    export_library(executable, path)  -> an aarch64 shared library (aarch64-linux-gnu-g++)
    build_runner()                    -> a folder holding tvm_runner (built once, then reused)
    run_library(library, inputs)      -> main's outputs as numpy arrays, run under
                                         qemu-aarch64-static -cpu CPU -L /usr/aarch64-linux-gnu
    missing_cpu_features(required)    -> what this ARM CPU lacks (/proc/cpuinfo), for running
                                         a library in process on an ARM host

The runner (`runner/runner.cc`, built by `runner/build.sh`) is a small C++ program linked
against the aarch64 `libtvm_runtime.so` / `libtvm_ffi.so` from the aarch64 apache-tvm /
apache-tvm-ffi wheels of the versions installed here: it loads the library into a Relax VM on
the CPU (pooled allocator, like `relax.VirtualMachine(lib, tvm.cpu())`), calls "main" on raw
tensor files and writes raw outputs back. The same folder (tvm_runner + lib/) runs natively on
an ARM Linux board.

`run_library(..., require=["sve"])` makes the runner check the CPU's hwcaps before it loads the
library: a library built with `"mattr": ["+sve"]` on a core without SVE then fails with "this
library was built for +sve but this CPU does not have sve" instead of an illegal instruction
inside some kernel (which `run_library` also reports, as "illegal instruction: ...").

Runner folder: `$GRAPHOPT_RUNNER_DIR` (the folder itself), else
`~/.cache/graphopt/aarch64-runner/<apache-tvm version>-<apache-tvm-ffi version>`. A build is
reused while its build-info.txt names these versions and the sha256 of runner.cc; delete the
folder to rebuild. Building needs aarch64-linux-gnu-g++ and pip access to PyPI (~100 MB of
wheels, downloaded once per folder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64-static"
SYSROOT = "/usr/aarch64-linux-gnu"  # the aarch64 glibc/libstdc++ qemu loads the runner with
RUNNER_SOURCES = Path(__file__).resolve().parent / "runner"

_PACKAGES = {
    CROSS_CXX: "apt-get install g++-aarch64-linux-gnu",
    QEMU: "apt-get install qemu-user-static",
    SYSROOT: "apt-get install libc6-arm64-cross libstdc++6-arm64-cross",
}
# numpy dtype <-> the TVM dtype names the runner reads and writes (outputs.txt)
_TVM_DTYPES = {
    np.dtype(name): name
    for name in "float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64".split()
    + ["bool"]
}
_NUMPY_DTYPES = {name: dtype for dtype, name in _TVM_DTYPES.items()}
_SIGILL_MESSAGE = "illegal instruction: the library uses a CPU feature this core does not have"


def missing_tools() -> list[str]:
    """The tools exporting and running aarch64 libraries need that are not installed here, each
    as "tool (apt-get install package)"; empty when everything is present."""
    missing = [
        f"{tool} ({_PACKAGES[tool]})" for tool in (CROSS_CXX, QEMU) if not shutil.which(tool)
    ]
    if shutil.which(CROSS_CXX) and not Path(SYSROOT, "lib").is_dir():
        missing.append(f"the aarch64 sysroot {SYSROOT} ({_PACKAGES[SYSROOT]})")
    return missing


def export_library(executable: Any, path: str | os.PathLike) -> None:
    """Write `executable` (a relax.VMExecutable compiled for an aarch64 target) as an aarch64
    shared library at `path`, linked by aarch64-linux-gnu-g++.

    Raises:
        RuntimeError: the cross compiler is not installed (names the Debian package).
    """
    if not shutil.which(CROSS_CXX):
        raise RuntimeError(
            f"exporting an aarch64 library needs {CROSS_CXX}, which is not installed "
            f"(Debian/Ubuntu: {_PACKAGES[CROSS_CXX]})"
        )
    executable.export_library(str(path), cc=CROSS_CXX)


# The feature names of runner.cc's --require (LLVM's mattr without "+") -> the names Linux lists
# under "Features" in /proc/cpuinfo on arm64.
_CPUINFO_NAMES = {
    "neon": "asimd",
    "asimd": "asimd",
    "fp16": "fphp",
    "dotprod": "asimddp",
    "sve": "sve",
    "sve2": "sve2",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sme": "sme",
}


def missing_cpu_features(
    required: Sequence[str], cpuinfo: str | os.PathLike = "/proc/cpuinfo"
) -> list[str]:
    """The features of `required` (e.g. a library's ["neon", "sve"]) that this aarch64 Linux
    CPU lacks, by /proc/cpuinfo: the in-process twin of the runner's --require check. Names
    it does not know (other LLVM attributes) are not checked."""
    present: set[str] = set()
    for line in Path(cpuinfo).read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Features":
            present.update(value.split())
    return [
        f
        for f in (name.lstrip("+") for name in required)
        if f in _CPUINFO_NAMES and _CPUINFO_NAMES[f] not in present
    ]


def default_runner_dir() -> Path:
    """`$GRAPHOPT_RUNNER_DIR`, else ~/.cache/graphopt/aarch64-runner/<tvm>-<tvm_ffi>."""
    configured = os.environ.get("GRAPHOPT_RUNNER_DIR")
    if configured:
        return Path(configured)
    tvm_version, ffi_version = _tvm_versions()
    return Path.home() / ".cache" / "graphopt" / "aarch64-runner" / f"{tvm_version}-{ffi_version}"


def build_runner(
    cache_dir: str | os.PathLike | None = None, progress: Callable[[str], Any] | None = print
) -> Path:
    """Build tvm_runner for aarch64 into `cache_dir` (default: `default_runner_dir()`), or reuse
    a complete build there; returns the folder (tvm_runner, lib/, wheels/, build-info.txt).

    Safe to call from several processes at once (pytest-xdist workers): builds are serialized
    by a file lock beside the folder, and build.sh moves the binary into place last.

    Args:
        cache_dir: the folder to build into.
        progress: called with each progress line of the build (None: silent).
    Raises:
        RuntimeError: a tool is missing, the wheel download or the compile failed (with the
            build's output).
    """
    import fcntl

    folder = Path(cache_dir) if cache_dir is not None else default_runner_dir()
    expected = _build_info()
    if _is_built(folder, expected):
        return folder
    if not shutil.which(CROSS_CXX):
        raise RuntimeError(
            f"building the aarch64 runner needs {CROSS_CXX}, which is not installed "
            f"(Debian/Ubuntu: {_PACKAGES[CROSS_CXX]})"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_built(folder, expected):  # another process built it while we waited
            return folder
        start = time.perf_counter()
        _run_build_script(folder, expected, progress or (lambda line: None))
        if not _is_built(folder, expected):
            raise RuntimeError(f"build.sh finished but {folder} does not hold a complete runner")
        log.info("built the aarch64 runner in %s in %.1f s", folder, time.perf_counter() - start)
    return folder


def run_library(
    library: str | os.PathLike,
    inputs: Sequence[np.ndarray],
    *,
    cpu: str = "max",
    require: Sequence[str] = (),
    runner_dir: str | os.PathLike | None = None,
    timeout: float = 600,
) -> list[np.ndarray]:
    """Run the "main" function of an aarch64 Relax library under qemu-aarch64-static.

    Args:
        library: a library written by `export_library`.
        inputs: main's tensor inputs in order (numpy arrays, or anything np.asarray takes,
            like CPU torch tensors); dtypes float16/32/64, (u)int8-64 and bool.
        cpu: qemu's `-cpu` model: "max" has every feature qemu emulates (SVE2, i8mm, ...),
            "cortex-a72" is a NEON-only core, "neoverse-n1" adds dotprod.
        require: CPU features the runner checks before loading the library (sve, sve2,
            asimd/neon, fp16, dotprod, i8mm, bf16, sme): pass the library's target features.
        runner_dir: a folder from `build_runner` (default: built or reused by build_runner).
        timeout: seconds before the run is killed.
    Returns:
        main's outputs, flattened in order, as numpy arrays with their dtype and shape.
    Raises:
        RuntimeError: qemu is missing, or the runner failed: its stderr (a wrong input count
            or shape, a missing file, a missing CPU feature), "illegal instruction: ..." when
            the library executed an instruction the emulated core lacks, or a timeout.
    """
    if not shutil.which(QEMU):
        raise RuntimeError(
            f"running an aarch64 library needs {QEMU}, which is not installed "
            f"(Debian/Ubuntu: {_PACKAGES[QEMU]})"
        )
    if runner_dir is None:
        runner_dir = build_runner(progress=log.info)
    runner = Path(runner_dir).absolute() / "tvm_runner"
    if not runner.is_file():
        raise RuntimeError(f"{runner} does not exist: build it with build_runner({runner_dir!r})")
    with tempfile.TemporaryDirectory(prefix="graphopt-aarch64-") as tmp:
        specs = [_write_input(Path(tmp), i, value) for i, value in enumerate(inputs)]
        out = Path(tmp) / "out"
        command = [QEMU, "-cpu", cpu, "-L", SYSROOT, str(runner), str(Path(library).absolute())]
        command += [str(out), *(arg for f in require for arg in ("--require", f)), *specs]
        where = f"tvm_runner on {Path(library).name} (qemu -cpu {cpu})"
        try:
            # cwd: a core dump qemu writes on a crash lands in the temp folder
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{where} did not finish in {timeout:g} s") from e
        stderr = done.stderr.strip()
        if done.returncode == -signal.SIGILL or "(Illegal instruction)" in stderr:
            raise RuntimeError(f"{where}: {_SIGILL_MESSAGE}\n{stderr}".rstrip())
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            raise RuntimeError(f"{where} was killed by {name}\n{stderr}".rstrip())
        if done.returncode != 0:
            raise RuntimeError(f"{where} failed (exit code {done.returncode}): {stderr}")
        return _read_outputs(out, where)


def _write_input(folder: Path, index: int, value: Any) -> str:
    """Write one input as raw little-endian C-contiguous bytes; returns its path:dtype:shape."""
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _TVM_DTYPES:
        raise TypeError(
            f"input {index} has dtype {array.dtype}; the runner takes "
            f"{', '.join(sorted(_NUMPY_DTYPES))}"
        )
    array = np.asarray(array, dtype=dtype, order="C")  # (ascontiguousarray makes 0-d 1-d)
    path = folder / f"input{index}.bin"
    array.tofile(path)
    return f"{path}:{_TVM_DTYPES[dtype]}:{_shape_text(array.shape)}"


def _read_outputs(out: Path, where: str) -> list[np.ndarray]:
    listing = out / "outputs.txt"
    if not listing.is_file():
        raise RuntimeError(f"{where} exited 0 but wrote no {listing.name}")
    outputs = []
    for line in listing.read_text().splitlines():
        name, dtype, shape = line.split(" ")
        if dtype not in _NUMPY_DTYPES:
            raise RuntimeError(f"{where}: output {name} has dtype {dtype}, which numpy lacks")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        data = np.fromfile(out / name, dtype=_NUMPY_DTYPES[dtype].newbyteorder("<"))
        outputs.append(data.astype(_NUMPY_DTYPES[dtype], copy=False).reshape(dims))
    return outputs


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _tvm_versions() -> tuple[str, str]:
    try:
        return version("apache-tvm"), version("apache-tvm-ffi")
    except PackageNotFoundError as e:
        raise RuntimeError(f"the aarch64 runner needs {e.name} installed (pip install it)") from e


def _build_info() -> dict[str, str]:
    """What build-info.txt must say for a build to be reused."""
    tvm_version, ffi_version = _tvm_versions()
    source = hashlib.sha256((RUNNER_SOURCES / "runner.cc").read_bytes()).hexdigest()
    return {"tvm": tvm_version, "tvm_ffi": ffi_version, "runner_sha256": source}


def _is_built(folder: Path, expected: dict[str, str]) -> bool:
    try:
        lines = (folder / "build-info.txt").read_text().splitlines()
    except OSError:
        return False
    info = dict(line.split("=", 1) for line in lines if "=" in line)
    return (folder / "tvm_runner").is_file() and all(info.get(k) == v for k, v in expected.items())


def _run_build_script(folder: Path, expected: dict[str, str], progress: Callable) -> None:
    """Run build.sh into `folder`, passing its stdout lines to `progress`."""
    env = {
        **os.environ,
        "CXX": CROSS_CXX,  # not the environment's CXX, which is often the host compiler
        "PYTHON": sys.executable,
        "TVM_VERSION": expected["tvm"],
        "TVM_FFI_VERSION": expected["tvm_ffi"],
    }
    command = ["bash", str(RUNNER_SOURCES / "build.sh"), str(folder)]
    with tempfile.TemporaryFile("w+") as stderr:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                progress(line.rstrip("\n"))
        stderr.seek(0)
        errors = stderr.read()
    if process.returncode != 0:
        tail = "\n".join(errors.strip().splitlines()[-30:])
        raise RuntimeError(
            f"building the aarch64 runner failed (exit code {process.returncode}):\n{tail}"
        )
