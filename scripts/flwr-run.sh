#!/usr/bin/env bash
# `flwr run ... --stream` that exits with the run's status.
#
# Flower 1.39's `flwr run --stream` exits 0 once the run's log has ended, whatever the run's status
# (finished:completed, :failed or :stopped). This runs it with the same arguments, asks the
# SuperLink for the run's status (`flwr ls --run-id ID --format json`) and exits 0 only when the run
# completed; otherwise it prints the status and Flower's details (for FedMUD the reason, as in the
# run's summary.json) and exits 1. When `flwr run` itself fails (the run was never started) it
# exits with that status.
#
#   scripts/flwr-run.sh . --federation-config "num-supernodes=10 client-resources-num-cpus=1"
#   scripts/flwr-run.sh . my-superlink -c configs/smoke.toml
#
# The arguments are `flwr run`'s (without --stream, which this adds; not --format json); a SUPERLINK
# connection, the second positional argument, is the one `flwr ls` asks.
set -euo pipefail

say() { echo "[flwr-run] $*" >&2; }

superlink=() positional=0 takes_value=0
for arg in "$@"; do
  if ((takes_value)); then takes_value=0; continue; fi
  case $arg in
  -c | --run-config | --federation-config | --federation | --format) takes_value=1 ;;
  -*) ;;
  *)
    positional=$((positional + 1))
    if ((positional == 2)); then superlink=("$arg"); fi
    ;;
  esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/flwr-run.XXXXXX")
trap 'rm -rf "$work"' EXIT

status=0
flwr run "$@" --stream | tee "$work/run.log" || status=$?
((status == 0)) || { say "flwr run exited with $status"; exit "$status"; }
# the first match only (sed quits there: no reader that stops early, no SIGPIPE under pipefail)
run_id=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p;/Successfully started run [0-9]/q' "$work/run.log")
[[ -n $run_id ]] || { say "no run was started (no 'Successfully started run' line)"; exit 1; }

flwr ls ${superlink[@]+"${superlink[@]}"} --run-id "$run_id" --format json >"$work/ls.json" ||
  { say "flwr ls could not tell the status of run $run_id"; cat "$work/ls.json" >&2; exit 1; }
python - "$work/ls.json" "$run_id" <<'EOF'
import json
import sys

path, run_id = sys.argv[1], sys.argv[2]
try:
    run = json.load(open(path))["runs"][0]
except (ValueError, KeyError, IndexError):
    sys.exit(f"[flwr-run] flwr ls gave no status for run {run_id}: {open(path).read()[-2000:]}")
status, details = run.get("status", "?"), run.get("status-details", "")
if status == "finished:completed":
    print(f"[flwr-run] run {run_id} {status}", file=sys.stderr)
    sys.exit(0)
sys.exit(f"[flwr-run] run {run_id} {status}: {details}")
EOF
