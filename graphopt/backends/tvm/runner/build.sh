#!/usr/bin/env bash
# Build tvm_runner for aarch64: the small C++ program that runs a graphopt/TVM library exported
# for target="aarch64" (under qemu-aarch64-static on x86, or natively on an ARM board).
#
#   build.sh OUT_DIR
#
# Environment:
#   CXX              the aarch64 C++ compiler (default aarch64-linux-gnu-g++; Debian/Ubuntu:
#                    apt-get install g++-aarch64-linux-gnu)
#   PYTHON           the python whose apache-tvm / apache-tvm-ffi give the versions and the
#                    headers (default python3)
#   TVM_VERSION      apache-tvm version of the aarch64 runtime (default: the one PYTHON has)
#   TVM_FFI_VERSION  apache-tvm-ffi version (default: the one PYTHON has)
#
# Writes OUT_DIR/wheels/ (the aarch64 wheels, downloaded once with pip), OUT_DIR/lib/
# (libtvm_runtime.so, libtvm_ffi.so from those wheels), OUT_DIR/build-info.txt and, last,
# OUT_DIR/tvm_runner (rpath $ORIGIN/lib: copy the folder as a whole to an ARM machine).
# Everything is built in a temp folder beside OUT_DIR and moved into place at the end.
set -euo pipefail

die() {
    echo "build.sh: $*" >&2
    exit 1
}

[[ $# -eq 1 && $1 != -* ]] || die "usage: build.sh OUT_DIR"
OUT_DIR=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE=$HERE/runner.cc
CXX=${CXX:-aarch64-linux-gnu-g++}
PYTHON=${PYTHON:-python3}

[[ -f $SOURCE ]] || die "runner source $SOURCE is missing"
command -v "$CXX" >/dev/null ||
    die "C++ compiler '$CXX' not found (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
command -v "$PYTHON" >/dev/null || die "python '$PYTHON' not found (set PYTHON)"

installed_version() {
    "$PYTHON" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null ||
        die "$1 is not installed in $PYTHON (pip install $1, or set the version variables)"
}
TVM_VERSION=${TVM_VERSION:-$(installed_version apache-tvm)}
TVM_FFI_VERSION=${TVM_FFI_VERSION:-$(installed_version apache-tvm-ffi)}

# Headers are architecture independent: take them from PYTHON's (x86) apache-tvm-ffi.
INCLUDES=$("$PYTHON" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("tvm_ffi")
root = list(spec.submodule_search_locations)[0] if spec else None
paths = [os.path.join(root, p) for p in ("include", "3rdparty/dlpack/include")] if root else []
print(" ".join(p for p in paths if os.path.isdir(p)))
EOF
) || die "cannot locate the apache-tvm-ffi headers with $PYTHON"
[[ -n $INCLUDES ]] || die "apache-tvm-ffi headers not found (pip install apache-tvm-ffi in $PYTHON)"

mkdir -p "$(dirname "$OUT_DIR")"
OUT_DIR=$(cd "$(dirname "$OUT_DIR")" && pwd)/$(basename "$OUT_DIR")
TMP=$(mktemp -d "$(dirname "$OUT_DIR")/.$(basename "$OUT_DIR").tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

WHEELS=$OUT_DIR/wheels
tvm_wheel() { compgen -G "$WHEELS/apache_tvm-$TVM_VERSION-*aarch64*.whl" | head -n1; }
ffi_wheel() { compgen -G "$WHEELS/apache_tvm_ffi-$TVM_FFI_VERSION-*aarch64*.whl" | head -n1; }
if [[ -z $(tvm_wheel) || -z $(ffi_wheel) ]]; then
    echo "downloading aarch64 wheels (apache-tvm $TVM_VERSION, apache-tvm-ffi $TVM_FFI_VERSION)..."
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --python-version 3.11 \
        "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" -d "$TMP/wheels" ||
        die "pip download of the aarch64 wheels failed"
    mkdir -p "$WHEELS"
    mv "$TMP"/wheels/*.whl "$WHEELS"/
else
    echo "using aarch64 wheels in $WHEELS"
fi
TVM_WHEEL=$(tvm_wheel)
FFI_WHEEL=$(ffi_wheel)
[[ -n $TVM_WHEEL && -n $FFI_WHEEL ]] || die "aarch64 wheels not found in $WHEELS after download"

echo "extracting libtvm_runtime.so and libtvm_ffi.so..."
mkdir -p "$TMP/lib"
"$PYTHON" - "$TMP/lib" "$TVM_WHEEL" tvm/lib/libtvm_runtime.so "$FFI_WHEEL" tvm_ffi/lib/libtvm_ffi.so <<'EOF' ||
import os, shutil, sys, zipfile
dest, pairs = sys.argv[1], sys.argv[2:]
for wheel, member in zip(pairs[::2], pairs[1::2]):
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            sys.exit(f"{wheel} has no {member}")
        with z.open(member) as src, open(os.path.join(dest, os.path.basename(member)), "wb") as dst:
            shutil.copyfileobj(src, dst)
EOF
    die "cannot extract the runtime libraries from the wheels"

echo "compiling runner with $CXX..."
# shellcheck disable=SC2086  # INCLUDES is a list of folders
INCLUDE_FLAGS=$(printf -- '-isystem %s ' $INCLUDES)
# shellcheck disable=SC2086,SC2016  # $ORIGIN is for the linker, not the shell
"$CXX" -std=c++17 -O2 -Wall $INCLUDE_FLAGS "$SOURCE" -o "$TMP/tvm_runner" \
    -L"$TMP/lib" -Wl,-rpath-link,"$TMP/lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi \
    -Wl,--as-needed -Wl,-rpath,'$ORIGIN/lib' ||
    die "compiling $SOURCE failed"

{
    echo "tvm=$TVM_VERSION"
    echo "tvm_ffi=$TVM_FFI_VERSION"
    echo "runner_sha256=$(sha256sum "$SOURCE" | cut -d' ' -f1)"
    echo "cxx=$CXX"
} >"$TMP/build-info.txt"

# Move into place; the binary goes last (its presence marks a complete build).
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/tvm_runner"
rm -rf "$OUT_DIR/lib"
mv "$TMP/lib" "$OUT_DIR/lib"
mv "$TMP/build-info.txt" "$OUT_DIR/build-info.txt"
mv "$TMP/tvm_runner" "$OUT_DIR/tvm_runner"
echo "built $OUT_DIR/tvm_runner"
