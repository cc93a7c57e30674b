#!/usr/bin/env bash
# Flower's simulation on an existing two-node Ray cluster, rehearsed on one host. Each "machine" is a
# network namespace of its own, joined by a veth pair on a private subnet (default 10.232.0.0/24):
#
#   head    10.232.0.1   `ray start --head`, then a simulation SuperLink with RAY_ADDRESS pointing at
#                        the head, and `flwr run` (the SuperLink's Ray backend joins the cluster
#                        instead of starting a Ray of its own)
#   worker  10.232.0.2   `ray start --address=10.232.0.1:6379`: a second Ray node
#
# Each Ray node offers one CPU and each ClientApp asks for one (client-resources-num-cpus=1), so the
# simulation runs two ClientApp actors: one on each node. Passes when the run completes and the
# ClientApp log lines Ray forwards from the worker node (prefixed "ip=10.232.0.2") are in its output.
# Both nodes share this host's file system, so the worker finds the project where the head does; on
# real machines every Ray node needs the same Python environment with this project installed
# (docs/deployment.md, "Simulation on a Ray cluster").
#
# Everything it creates (the namespaces, every process in them, a temporary directory) is removed on
# exit, failure included; KEEP=1 keeps the directory with the logs. It never runs `ray stop`, which
# would stop every Ray instance on the host, not only this script's.
#
#   scripts/ray-cluster-smoke.sh                 # as root; ~1-2 min on 2 cores
#   ROUNDS=3 SUBNET=10.232.7 scripts/ray-cluster-smoke.sh
set -euo pipefail
if [[ $(id -u) != 0 ]]; then
  if command -v sudo >/dev/null; then
    exec sudo --preserve-env=ROUNDS,SUBNET,TIMEOUT,KEEP,VENV "$0" "$@"
  fi
  echo "ray-cluster-smoke: needs root (ip netns); run it as root" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
[[ -x $VENV/bin/ray && -x $VENV/bin/flower-superlink ]] || {
  echo "ray-cluster-smoke: no Ray or Flower in $VENV (set VENV; pip install -e .)" >&2; exit 2; }
export PATH=$VENV/bin:$PATH FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

SUBNET=${SUBNET:-10.232.0}
ROUNDS=${ROUNDS:-2}
TIMEOUT=${TIMEOUT:-600}
HEAD_IP=$SUBNET.1 WORKER_IP=$SUBNET.2
tag=fr$$
HEAD=${tag}-head WORKER=${tag}-worker
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmud-ray.XXXXXX")
T0=$SECONDS
say() { printf '[ray-cluster-smoke %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
# ns_exists NAME: the namespace exists. grep reads a here-string, not a pipe: under pipefail
# `ip netns list | grep -q` fails when grep stops at the first match and `ip` gets SIGPIPE.
ns_exists() { grep -qw -- "$1" <<<"$(ip netns list)"; }

cleanup() {
  local status=$?
  for ns in "$HEAD" "$WORKER"; do
    if ns_exists "$ns"; then
      pids=$(ip netns pids "$ns" || true)
      [[ -z $pids ]] || kill -TERM $pids 2>/dev/null || true
    fi
  done
  sleep 2
  for ns in "$HEAD" "$WORKER"; do
    if ns_exists "$ns"; then
      pids=$(ip netns pids "$ns" || true)
      [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
      ip netns delete "$ns" 2>/dev/null || true
    fi
  done
  if [[ ${KEEP:-0} == 1 || $status != 0 ]]; then
    say "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $status
}
trap cleanup EXIT

say "namespaces $HEAD ($HEAD_IP) and $WORKER ($WORKER_IP)"
ip netns add "$HEAD"
ip netns add "$WORKER"
ip link add "${tag}a" netns "$HEAD" type veth peer name "${tag}b" netns "$WORKER"
ip -n "$HEAD" addr add "$HEAD_IP/24" dev "${tag}a"
ip -n "$WORKER" addr add "$WORKER_IP/24" dev "${tag}b"
for ns in "$HEAD" "$WORKER"; do
  ip -n "$ns" link set lo up
done
ip -n "$HEAD" link set "${tag}a" up
ip -n "$WORKER" link set "${tag}b" up

in_ns() { local ns=$1; shift; ip netns exec "$ns" env HOME="$WORK/home" "$@"; }
mkdir -p "$WORK/home"

say "Ray head on $HEAD_IP:6379, one CPU"
in_ns "$HEAD" ray start --head --node-ip-address "$HEAD_IP" --port 6379 --num-cpus 1 \
  --include-dashboard false --temp-dir "$WORK/ray-head" --disable-usage-stats >"$WORK/ray-head.log" 2>&1
say "Ray worker node on $WORKER_IP, one CPU"
in_ns "$WORKER" ray start --address "$HEAD_IP:6379" --node-ip-address "$WORKER_IP" --num-cpus 1 \
  --disable-usage-stats >"$WORK/ray-worker.log" 2>&1
for _ in $(seq 60); do  # wait until the head counts both nodes
  in_ns "$HEAD" python -c "
import ray, sys
ray.init(address='$HEAD_IP:6379', logging_level='ERROR')
sys.exit(0 if len([n for n in ray.nodes() if n['Alive']]) == 2 else 1)" >/dev/null 2>&1 && break
  sleep 2
done
in_ns "$HEAD" ray status --address "$HEAD_IP:6379" >"$WORK/ray-status.txt" 2>&1 || true
grep -q "2.0 CPU\|2.0/2.0 CPU\|0.0/2.0 CPU" "$WORK/ray-status.txt" || { cat "$WORK/ray-status.txt"; say "FAIL: the cluster does not show 2 CPUs"; exit 1; }

say "simulation SuperLink in $HEAD joining the cluster (RAY_ADDRESS=$HEAD_IP:6379)"
mkdir -p "$WORK/flwr-home"
superlink=$(in_ns "$HEAD" python -c "
from pathlib import Path
from bench.superlink import superlink_command
args, http, fleet = superlink_command(Path('$WORK/flwr-home'), Path('$WORK/state.db'), 'cluster', True)
print(' '.join(args))")
in_ns "$HEAD" env RAY_ADDRESS="$HEAD_IP:6379" FLWR_HOME="$WORK/flwr-home" setsid $superlink >"$WORK/superlink.log" 2>&1 &
sleep 10

say "flwr run: 4 supernodes, one CPU each, $ROUNDS rounds"
set +e
in_ns "$HEAD" env FLWR_HOME="$WORK/flwr-home" timeout "$TIMEOUT" flwr run . cluster --stream \
  --federation-config "num-supernodes=4 client-resources-num-cpus=1" \
  -c "num-server-rounds=$ROUNDS local-epochs=1 run-dir=\"$WORK/runs\"" >"$WORK/run.log" 2>&1
rc=$?
set -e
grep -a "FINAL" "$WORK/run.log" || true
# `flwr run` exits 0 whatever the run's status, and a failed run writes a summary too: read its status
completed=$(grep -l '"status": "completed"' "$WORK"/runs/*/summary.json 2>/dev/null || true)
[[ $rc == 0 && -n $completed ]] || { tail -40 "$WORK/run.log"; say "FAIL: the run did not complete (rc $rc)"; exit 1; }
head_lines=$(grep -ac "ClientAppActor pid=[0-9]*)" "$WORK/run.log" || true)
worker_lines=$(grep -ac "ClientAppActor pid=[0-9]*, ip=$WORKER_IP)" "$WORK/run.log" || true)
say "ClientApp log lines: $head_lines from the head node, $worker_lines from the worker node ($WORKER_IP)"
[[ $worker_lines -gt 0 ]] || { say "FAIL: no ClientApp ran on the worker node"; exit 1; }
say "PASS: the simulation ran its ClientApps on both Ray nodes"
