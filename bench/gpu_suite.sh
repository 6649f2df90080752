#!/usr/bin/env bash
# One device call on a GPU machine without network: install the carried wheels, run the GPU check,
# then the test suite (CUDA tests first, then every non-slow test), logs and reports under $OUT.
#
#   bash bench/gpu_suite.sh                      # on the GPU machine, from the repository root
#   GPU_SUITE_DRY_RUN=1 OUT=/tmp/s bash bench/gpu_suite.sh   # here, on CPU: wheels checked against
#                                                # Python 3.12 manylinux tags, dry-run check, CUDA tests skip
#
# Wheels: every *.whl in .whl/ and .whl_extra/, listed in bench/gpu_wheels.txt (what the GPU image lacks or has in another version:
# transformers 5.24, peft 0.21.2, bitsandbytes, trl, deepspeed, datasets, mistral-common, wandb, ...),
# installed with --no-deps into the image's own Python environment, so torchrun workers and other
# subprocesses of the tests see them too (they do not inherit an extended PYTHONPATH: some tests set
# their own). The machine is fresh at every start; nothing outlives the call.
#
# Time: the whole call stops by SUITE_BUDGET_S (default 480 s) after it starts; the GPU check gets
# CHECK_BUDGET_S (default 240 s, its own section budget; ~100-150 s used on an H200) and the suite
# whatever is left (-v, so a suite stopped by the limit still shows each test that ran).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_suite}
DRY=${GPU_SUITE_DRY_RUN:-0}
SUITE_BUDGET_S=${SUITE_BUDGET_S:-480}
CHECK_BUDGET_S=${CHECK_BUDGET_S:-240}
WORKERS=${WORKERS:-14}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }
left() { echo $((START + SUITE_BUDGET_S - $(date +%s))); }

log "gpu_suite: out=$OUT dry=$DRY budget=${SUITE_BUDGET_S}s python=$($PY -c 'import sys; print(sys.version.split()[0], sys.executable)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/suite.log" 2>&1 || log "no nvidia-smi"

# 1. wheels ------------------------------------------------------------------------------------------
mapfile -t WHEELS < <(ls .whl/*.whl .whl_extra/*.whl 2>/dev/null)
log "installing ${#WHEELS[@]} wheels (--no-deps, offline)"
if [ "${#WHEELS[@]}" -gt 0 ]; then
  if [ "$DRY" = 1 ]; then  # here: check that every wheel fits the GPU image's Python (3.12, manylinux x86_64)
    $PY -m pip install -q --no-deps --no-index --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --target "$OUT/site-check" "${WHEELS[@]}" >"$OUT/pip_install.log" 2>&1
  else
    $PY -m pip install --no-deps --no-index "${WHEELS[@]}" >"$OUT/pip_install.log" 2>&1
  fi
  rc=$?
  log "pip install rc=$rc (log: pip_install.log)"
  [ $rc -ne 0 ] && tail -20 "$OUT/pip_install.log" | tee -a "$OUT/suite.log"
fi
if [ "$DRY" != 1 ]; then
  $PY -m pip install --no-deps --no-index --no-build-isolation -e . >>"$OUT/pip_install.log" 2>&1 \
    && log "pip install -e . ok" || log "pip install -e . failed (tests use the checkout through pytest's pythonpath)"
  $PY -m pip check >"$OUT/pip_check.log" 2>&1; log "pip check rc=$? (informational: pip_check.log)"
fi
$PY - <<'EOF' 2>&1 | tee -a "$OUT/suite.log"
import importlib.metadata as m
names = ["torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "deepspeed",
         "mistral_common", "huggingface_hub", "tokenizers", "numpy", "pyarrow", "hydra-core", "wandb",
         "minijinja", "flash_attn", "pytest", "pytest-xdist"]
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("versions: " + ", ".join(f"{n} {version(n)}" for n in names))
import torch
print(f"cuda: {torch.cuda.is_available()} {torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
EOF

# 2. the GPU check -------------------------------------------------------------------------------------
CHECK_ARGS=(--out "$OUT" --budget-s "$CHECK_BUDGET_S")
[ "$DRY" = 1 ] && CHECK_ARGS+=(--dry-run)
if [ "${SKIP_CHECK:-0}" != 1 ]; then  # SKIP_CHECK=1: a second call on the warm machine runs only the tests
  log "gpu_check ${CHECK_ARGS[*]} (timeout $((CHECK_BUDGET_S + 90)) s)"
  PYTHONPATH="$PWD" timeout -k 10 $((CHECK_BUDGET_S + 90)) $PY bench/gpu_check.py "${CHECK_ARGS[@]}" >"$OUT/gpu_check.log" 2>&1
  log "gpu_check rc=$? ($(tail -1 "$OUT/gpu_check.log"))"
  if [ "$DRY" != 1 ]; then  # grouped backends against per_expert at Mixtral-8x7B expert shapes: settles `auto` on CUDA
    PYTHONPATH="$PWD" timeout -k 5 90 $PY bench/expert_backends.py --device cuda --hidden 4096 --intermediate 14336 \
      --tokens 4096 --dtypes bf16 --rounds 5 >"$OUT/expert_backends_cuda.log" 2>&1
    log "expert_backends cuda rc=$?"
  fi
fi

# 3. the tests: CUDA ones first, alone; then every non-slow test --------------------------------------
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # many pytest workers on 16 cores: one thread each
T=$(( $(left) - 20 )); [ $T -lt 30 ] && T=30
log "pytest CUDA tests (timeout ${T}s)"
timeout -k 10 $T $PY -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_model_config.py \
  --junitxml="$OUT/junit_cuda.xml" >"$OUT/pytest_cuda.log" 2>&1
log "pytest CUDA rc=$? ($(tail -1 "$OUT/pytest_cuda.log"))"
SUITE_ARGS=(-m "not slow" -v -rfEs -p no:cacheprovider --maxfail=30 --durations=15 --junitxml="$OUT/junit.xml")
if [ "$DRY" = 1 ]; then
  SUITE_ARGS+=(tests/test_cuda.py tests/test_model_config.py tests/test_qlora_memory.py)
else
  SUITE_ARGS+=(-n "$WORKERS" --timeout=240)  # pytest-xdist and pytest-timeout are in the GPU image
fi
T=$(( $(left) - 10 )); [ $T -lt 30 ] && T=30
log "pytest ${SUITE_ARGS[*]} (timeout ${T}s)"
timeout -k 10 $T $PY -m pytest "${SUITE_ARGS[@]}" >"$OUT/pytest.log" 2>&1
rc=$?
[ $rc -eq 124 ] && log "pytest stopped by the time limit: see pytest.log for the tests that ran"
log "pytest rc=$rc ($(tail -1 "$OUT/pytest.log"))"
log "done in $(( $(date +%s) - START )) s"
# The device tool brings back at most 8 files: the logs beside the reports go in one archive.
if [ "$DRY" != 1 ]; then
  (cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz --exclude='site-check' ./*.log ./*.xml 2>/dev/null \
    && rm -f ./*.xml pip_install.log pip_check.log pytest_cuda.log expert_backends_cuda.log)
fi
