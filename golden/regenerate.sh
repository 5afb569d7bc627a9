#!/usr/bin/env bash
# Regenerate the committed golden suite: golden/regenerate.sh [OUT]   (default: this directory)
#
# Writes OUT/tiny-dense/ and OUT/tiny-moge/ (every operator of each preset in fp64, fp32,
# bf16 and fp16, paged caches in blocks of 8; the MoE operators whose numbers depend on the
# numerics profile again under --conventions vllm-ascend; plus a layer-0 case and a model case
# in bf16, and the same for the W8A8 checkpoints of the preset that `quantize` writes)
# and OUT/environment.json.
# Everything goes to a temporary directory first and replaces the old suite only when all
# commands succeeded. tests/test_golden.py runs this script and requires the files to be
# bit-identical to the committed ones.
#
# The same command on the same machine always writes the same bytes. Across machines the
# last bits of a matrix product or an exp() depend on the SIMD code path NumPy and OpenBLAS
# pick for the CPU, so this script pins both to their baseline x86-64 kernels (slow, but
# the suite is tiny): then any x86-64 machine with the same NumPy/OpenBLAS versions
# (recorded in environment.json) reproduces the suite bit for bit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here}"
python="${PYTHON:-python}"
case "$python" in    # absolute, since the quantised cases run from another directory
  */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;;
esac

# OpenBLAS: its most generic x86-64 kernels. NumPy: every dispatched SIMD target off, so only
# the build's baseline (X86_V2 for NumPy 2.x wheels) runs.
export OPENBLAS_CORETYPE=Prescott
NPY_DISABLE_CPU_FEATURES="$("$python" -c 'import numpy
simd = numpy.show_config(mode="dicts")["SIMD Extensions"]
print(" ".join(simd.get("found", []) + simd.get("not found", [])))')"
export NPY_DISABLE_CPU_FEATURES

mkdir -p "$out"
tmp="$(mktemp -d "$out/.regenerate-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
calib="$tmp/calibration-ids.txt"       # the quantised cases' calibration set: token ids
printf '1,5,7,9,11,13,2,4,6,8,10,12\n3,14,15,16,17,18,19,20,21,22,23,24\n' > "$calib"

for preset in tiny-dense tiny-moge; do
  for mode in fp64 fp32 bf16 fp16; do
    "$python" -m refimpl golden --preset "$preset" --numerics "$mode" --seed 0 --tokens 8 \
      --block-size 8 --out "$tmp/$preset" >/dev/null
    if [ "$preset" = tiny-moge ]; then   # the operators whose numbers depend on the profile
      "$python" -m refimpl golden --preset "$preset" --numerics "$mode" --seed 0 --tokens 8 \
        --conventions vllm-ascend --ops moge_route,moe,moe_ep --out "$tmp/$preset" >/dev/null
    fi
  done
  "$python" -m refimpl golden --model "$preset" --token-ids 1,5,7,9,11,13 --layers 0 \
    --numerics bf16 --seed 0 --out "$tmp/$preset" >/dev/null
  # a W8A8 checkpoint of the preset (static, plus dynamic for the MoGE expert path),
  # calibrated on fixed token ids: its layer-0 and model cases, int8/int32 taps included
  schemes=w8a8
  [ "$preset" = tiny-moge ] && schemes="w8a8 w8a8_dynamic"
  mkdir -p "$tmp/q"
  for scheme in $schemes; do
    q="$preset-$scheme"     # run from $tmp/q: the manifests record this relative path
    (cd "$tmp/q" && "$python" -m refimpl quantize --model "$preset" --scheme "$scheme" \
       --calib "$calib" --out "$q" >/dev/null 2>"$q.log" || { cat "$q.log" >&2; exit 1; })
    (cd "$tmp/q" && "$python" -m refimpl golden --model "$q" --token-ids 1,5,7,9,11,13 \
       --layers 0 --numerics bf16 --seed 0 --out "$tmp/$preset" >/dev/null)
  done
done
rm -rf "$tmp/q"

"$python" - "$tmp/environment.json" <<'EOF'
import json, os, platform, sys
import ml_dtypes, numpy
import refimpl
config = numpy.show_config(mode="dicts")
blas = config["Build Dependencies"]["blas"]
env = {"machine": platform.machine(), "numpy": numpy.__version__,
       "ml_dtypes": ml_dtypes.__version__, "refimpl": refimpl.__version__,
       "blas": f"{blas.get('name')} {blas.get('version')}",
       "numpy_simd_baseline": config["SIMD Extensions"]["baseline"],
       "OPENBLAS_CORETYPE": os.environ["OPENBLAS_CORETYPE"],
       "NPY_DISABLE_CPU_FEATURES": os.environ["NPY_DISABLE_CPU_FEATURES"]}
with open(sys.argv[1], "w") as fh:
    json.dump(env, fh, indent=1)
    fh.write("\n")
EOF

for preset in tiny-dense tiny-moge; do
  rm -rf "$out/$preset"
  mv "$tmp/$preset" "$out/$preset"
done
mv "$tmp/environment.json" "$out/environment.json"
echo "wrote the golden suite to $out ($(du -sh --apparent-size "$out" | cut -f1))"
