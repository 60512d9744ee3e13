#!/usr/bin/env bash
# The wheel alone, in a fresh venv: build it with the repo's venv, install it with only the
# core dependencies (no extras) next to PyTorch, and from a directory outside the repo (so the
# source tree cannot be imported) check that
#   - `import structvit` and timm.create_model("structvit_tiny") work and a forward pass runs,
#   - the op runs with backend="auto" and, where a C++ compiler is found, "fused" and keyconv's
#     pattern-convolution kernel (compiled from the wheel's csrc/) match "naive",
#   - no optional dependency (lightning, matplotlib, av, sklearn, jsonargparse, ...) was imported,
#   - `structvit fit --help` without the training extra names the extra to install (exit 2).
#
# Usage: bash .ci/clean_install.sh    (PY=... for the python that builds; TORCH_SPEC=... for PyTorch)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-$REPO/.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}  # timm requires torchvision: pin the matching build
START=$SECONDS

if ! "$PY" -c "import build" 2>/dev/null; then
    echo "clean_install: $PY has no 'build' module; run \`make install\` (the dev extra has it)" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/structvit-clean.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "clean_install: building the wheel"
# From a copy of the files the build reads, so a stale build/ or egg-info in the checkout cannot leak into it.
mkdir "$WORK/tree"
cp pyproject.toml README.md "$WORK/tree/"
cp -r src "$WORK/tree/src"
find "$WORK/tree/src" \( -name "__pycache__" -o -name "*.egg-info" \) -prune -exec rm -rf {} +
"$PY" -m build --wheel --outdir "$WORK/dist" "$WORK/tree" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
WHEEL=$(ls "$WORK"/dist/structvit-*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
csrc = [f"structvit/ops/csrc/{f}" for f in ("fused_cpu.cpp", "pattern_conv_cpu.cpp", "abi.h", "parallel.h", "vec.h")]
missing = [n for n in (*csrc, "structvit/__init__.py", "structvit/cli.py") if n not in names]
assert not missing, f"the wheel lacks {missing} (see [tool.setuptools.package-data] in pyproject.toml)"
assert not any(n.startswith("configs/") or n.startswith("tests/") for n in names), "the wheel ships repo files"
print(f"clean_install: {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, the kernel sources (csrc/) included")
EOF

echo "clean_install: fresh venv, $TORCH_SPEC, then the wheel (core dependencies only)"
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
"$VPY" -m pip install -q $TORCH_SPEC >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; exit 1; }
"$VPY" -m pip install -q "$WHEEL" >>"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; exit 1; }
T_INSTALL=$((SECONDS - START))

mkdir "$WORK/run"
cd "$WORK/run"  # outside the repo: `import structvit` must find the installed wheel
export STRUCTVIT_CACHE="$WORK/cache"  # build the fused kernel afresh, from the wheel's source
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset PYTHONPATH
"$VPY" - "$WORK/venv" <<'EOF'
import shutil, sys
import torch, timm
import structvit
from structvit.ops import resolve_backend, struct_attention

assert structvit.__file__.startswith(sys.argv[1]), f"imported {structvit.__file__}, not the installed wheel"
m = timm.create_model("structvit_tiny", num_classes=3).eval()
with torch.no_grad():
    y = m(torch.randn(1, 3, 64, 64))
assert y.shape == (1, 3), y.shape

torch.manual_seed(0)
grid, heads, n, c, d = (4, 4), 2, 16, 8, 2
q, k, v = (torch.randn(1, heads, n, c) for _ in range(3))
u_k, u_v = torch.randn(d, 3, 3), torch.randn(d, 3, 3)
ref = struct_attention(q, k, v, u_k, u_v, grid, backend="naive")
out = struct_attention(q, k, v, u_k, u_v, grid, backend="auto")
chosen = resolve_backend(q, u_k, grid, backend="auto")
assert torch.allclose(out, ref, atol=1e-5), f"auto ({chosen}) differs from naive"
if any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
    fused = struct_attention(q, k, v, u_k, u_v, grid, backend="fused")
    assert torch.allclose(fused, ref, atol=1e-5), "fused differs from naive"
    from structvit.ops.backends.keyconv import pattern_layout
    uc_k, uc_v = torch.randn(heads, c, d, 3, 3), torch.randn(heads, c, d, 3, 3)  # the paper's channel-wise form
    assert pattern_layout(k, uc_k.unsqueeze(3), (1, 4, 4), (1, 2, 2)) == "native"
    ref_c = struct_attention(q, k, v, uc_k, uc_v, grid, kv_stride=2, backend="naive")
    out_c = struct_attention(q, k, v, uc_k, uc_v, grid, kv_stride=2, backend="keyconv")
    assert torch.allclose(out_c, ref_c, atol=1e-5), "keyconv's kernel differs from naive"
    fused_note = "fused and keyconv's kernel (built from the wheel's source) match naive"
else:
    fused_note = "no C++ compiler: fused not checked"

optional = ["lightning", "pytorch_lightning", "matplotlib", "av", "sklearn", "jsonargparse", "tensorboard",
            "torchmetrics"]
imported = [name for name in optional if name in sys.modules]
assert not imported, f"the core imported optional dependencies: {imported}"
print(f"clean_install: structvit_tiny forward OK, op auto -> {chosen} OK, {fused_note}, no optional imports")
EOF

set +e
"$WORK/venv/bin/structvit" fit --help >"$WORK/fit.out" 2>"$WORK/fit.err"
rc=$?
set -e
if [ "$rc" -ne 2 ] || ! grep -q 'pip install "structvit\[train\]"' "$WORK/fit.err" || grep -q Traceback "$WORK/fit.err"; then
    echo "clean_install: \`structvit fit --help\` without the training extra: exit $rc (expected 2 and the extra's name)" >&2
    cat "$WORK/fit.out" "$WORK/fit.err" >&2
    exit 1
fi
echo "clean_install: structvit fit --help -> $(cat "$WORK/fit.err")"
echo "clean_install: OK in $((SECONDS - START)) s (install ${T_INSTALL} s)"
