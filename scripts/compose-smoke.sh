#!/usr/bin/env bash
# Smoke test of the one-host Compose deployment, with the commands of docs/deployment.md ("One
# host") run as written in a scratch copy of the project: `docker compose up --build` runs a short
# FedMUD federation (SuperLink, FEDMUD_CLIENTS SuperNodes, the run submitter) and the whole stack
# must end by itself when the run ends, with every container's status 0; the run must have
# completed every round, written its results under results/<project>/, and the ledger's bytes must
# match Flower's own traffic counters. Also: no Compose command tries to pull the image it builds;
# two projects (`docker compose -p ...`) share no container name, host port or volume; the GPU
# overlay is a valid Compose file; `docker compose down -v` leaves no volume. Too slow for .ci/run;
# see docs/deployment.md for durations.
#
#   scripts/compose-smoke.sh                    # 2 clients, 2 rounds, 1 local epoch
#   FEDMUD_CLIENTS=3 FEDMUD_ROUNDS=3 scripts/compose-smoke.sh
#
# Needs a Docker engine with Compose v2 (in this workplace: ../shared/tools/local-docker, as root).
# Removes its containers, network, volume and image on exit; keeps the build cache, and the
# scratch directory with the results and logs when it fails or KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/smoke-lib.sh

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-fedmud-smoke-$$}
export FEDMUD_CLIENTS=${FEDMUD_CLIENTS:-2}
export FEDMUD_ROUNDS=${FEDMUD_ROUNDS:-2}
export FEDMUD_PRESET=${FEDMUD_PRESET-smoke}
export FEDMUD_RUN_CONFIG=${FEDMUD_RUN_CONFIG-local-epochs=1}
# An image tag of its own that exists in no registry: a Compose file that tried to pull it would fail.
export FEDMUD_IMAGE=fedmud-smoke:$COMPOSE_PROJECT_NAME
TIMEOUT=${SMOKE_TIMEOUT:-1800}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmud-compose.XXXXXX")
TREE=$WORK/tree LOGS=$WORK/logs
mkdir -p "$LOGS"

say() { printf '[compose-smoke %3ds] %s\n' "$SECONDS" "$*"; }
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -d $TREE ]]; then
    (cd "$TREE" && docker compose --profile tensorboard down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1) || true
  fi
  docker image rm "$FEDMUD_IMAGE" >/dev/null 2>&1 || true
  docker image prune --force --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" >/dev/null 2>&1 || true
  if [[ $status == 0 && ${KEEP:-0} != 1 ]]; then rm -rf "$WORK"; else echo "[compose-smoke] files kept in $WORK" >&2; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

copy_tree "$TREE"
cd "$TREE"
say "project copied to $TREE; project $COMPOSE_PROJECT_NAME, image tag $FEDMUD_IMAGE"

# --- static checks: two federations side by side; the GPU overlay ------------------------------
doc one-host-second --sub "up --build" "config --format json" >"$LOGS/second.json" 2>"$LOGS/second.err" ||
  { cat "$LOGS/second.err"; exit 1; }
docker compose config --format json >"$LOGS/first.json"
python3 - "$LOGS/first.json" "$LOGS/second.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
problems = []
for config in (a, b):
    for name, service in config["services"].items():
        if service.get("container_name"):
            problems.append(f"{config['name']}/{name}: fixed container_name {service['container_name']}")
        if service.get("ports"):
            problems.append(f"{config['name']}/{name}: publishes {service['ports']}")
shared = {v["name"] for v in a.get("volumes", {}).values()} & {v["name"] for v in b.get("volumes", {}).values()}
if shared:
    problems.append(f"volumes shared by both projects: {sorted(shared)}")
results = lambda c: {v["source"] for s in c["services"].values() for v in s.get("volumes", []) if v.get("target") == "/results"}
if results(a) & results(b):
    problems.append(f"results directory shared: {sorted(results(a) & results(b))}")
if problems:
    sys.exit("FAIL: two projects clash: " + "; ".join(problems))
print(f"[compose-smoke] projects {a['name']} and {b['name']}: no fixed container names or host ports, "
      f"volumes {sorted(v['name'] for v in a['volumes'].values())} vs {sorted(v['name'] for v in b['volumes'].values())}, "
      f"results {sorted(results(a))[0].split('/')[-1]} vs {sorted(results(b))[0].split('/')[-1]}")
EOF
docker compose -f docker-compose.yml -f docker-compose.gpu.yml config --quiet
say "docker-compose.gpu.yml overlay: valid Compose file"

# --- the run: `docker compose up --build` as written; no --abort-on-container-exit -------------
t1=$SECONDS
status=0
timeout "$TIMEOUT" bash -euo pipefail -c "$(doc_text one-host-up)" >"$LOGS/up.log" 2>&1 || status=$?
grep -E "round [0-9]+: accuracy|FINAL accuracy|bytes|completed" "$LOGS/up.log" || true
[[ $status == 0 ]] || { say "FAIL: block 'one-host-up' exited with $status:"; tail -n 40 "$LOGS/up.log"; exit 1; }
t2=$SECONDS
say "block 'one-host-up' (docker compose up --build) returned after $((t2 - t1)) s"

# `up` returns when the run service (the only attached one) exits; the SuperLink and the SuperNodes
# see the run's end marker and stop within seconds, each with status 0.
docker compose ps --quiet --status running >"$LOGS/running.txt"
if [[ -s $LOGS/running.txt ]] && ! timeout 60 docker wait $(cat "$LOGS/running.txt") >/dev/null; then
  say "FAIL: containers still running a minute after the run ended"; docker compose ps; exit 1
fi
docker compose ps --all --quiet >"$LOGS/containers.txt"
while read -r id; do
  read -r name code < <(docker inspect --format '{{.Name}} {{.State.ExitCode}}' "$id")
  [[ $code == 0 ]] || { say "FAIL: $name exited with $code"; exit 1; }
done <"$LOGS/containers.txt"
say "the stack ended by itself $((SECONDS - t2)) s after the run; $(wc -l <"$LOGS/containers.txt") containers, every one exited with 0"

if grep -E "Pulling|pull access denied|repository does not exist" "$LOGS/up.log" >"$LOGS/pulls.txt"; then
  say "FAIL: Compose tried to pull $FEDMUD_IMAGE:"; cat "$LOGS/pulls.txt"; exit 1
fi
say "no pull attempted for the locally built image"

run_dir=$(newest_run "results/$COMPOSE_PROJECT_NAME")
[[ -n $run_dir ]] || { say "FAIL: no summary.json under results/$COMPOSE_PROJECT_NAME (the default FEDMUD_RESULTS_DIR)"; exit 1; }
check_run "$run_dir" "$FEDMUD_ROUNDS" "$LOGS/check.log" compose-smoke

# --- down -v as written: nothing of the project is left --------------------------------------
doc one-host-down >"$LOGS/down.log" 2>&1 || { cat "$LOGS/down.log"; exit 1; }
docker volume ls --quiet --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" >"$LOGS/volumes.txt"
docker ps --all --quiet --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" >>"$LOGS/volumes.txt"
[[ ! -s $LOGS/volumes.txt ]] || { say "FAIL: 'docker compose down -v' left: $(tr '\n' ' ' <"$LOGS/volumes.txt")"; exit 1; }
say "block 'one-host-down' (docker compose down -v) left no container or volume"
say "PASS in $SECONDS s (up $((t2 - t1)) s); results in $run_dir$([[ ${KEEP:-0} == 1 ]] || echo ' (removed with the scratch copy; KEEP=1 keeps them)')"
