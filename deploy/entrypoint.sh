#!/usr/bin/env bash
# Entry point of the FedMUD image; the first argument is the container's role.
#
#   superlink    flower-superlink (Fleet API gRPC :9092, Control/Runtime HTTP API :9093); the ServerApp
#                runs in a subprocess and writes results under $FEDMUD_RESULTS
#   supernode    flower-supernode with node config "partition-id=P num-partitions=N"
#   run          submit one FedMUD run to the SuperLink, stream its logs, check the bytes, exit with
#                the run's outcome
#   register     register SuperNode public keys (arguments: KEY.pub ...) for node authentication
#   flwr ...     the flwr CLI with the connection "fedmud" to $SUPERLINK_CONTROL written first, e.g.
#                `flwr supernode ls fedmud`, `flwr ls fedmud`, `flwr stop RUN_ID fedmud`
#   preflight ROLE   only the certificate/key checks of ROLE (superlink, supernode, cli)
#   tensorboard  TensorBoard on :6006 over $FEDMUD_RESULTS
#   anything else is executed as a command (e.g. `bash`)
#
# Before Flower starts, every role with FEDMUD_TLS_DIR set checks its certificate and key files
# (deploy/preflight.py): a missing, unreadable, non-PEM or mismatched file (a ca.crt that does not
# verify server.pem, or that the SuperLink's certificate is not signed by) stops the role with one
# "[fedmud preflight] ERROR: ..." line naming the file and what to pass instead, exit status 2.
#
# It also runs outside a container, from the project's virtual environment (scripts/netns-smoke.sh);
# relative paths in the variables below and in `register`'s arguments are relative to the directory
# it is started from.
#
# Environment (defaults in brackets):
#   FEDMUD_TLS_DIR       directory with ca.crt (all roles) and server.pem/server.key (superlink);
#                        empty: plaintext (--insecure) [empty]
#   FEDMUD_NODE_AUTH     1: the SuperLink admits only SuperNodes whose public key was registered [0]
#   FEDMUD_NODE_KEY      SuperNode's private key (ECDSA, OpenSSH format) for node authentication [none]
#   FEDMUD_CLIENT_HOST   1 (deploy/compose.client.yml): SUPERLINK_FLEET, PARTITION_ID, NUM_PARTITIONS
#                        and NODE_KEY (the key's path inside FEDMUD_TLS_DIR) must be set [0]
#   FEDMUD_HOST_TLS_DIR  where FEDMUD_TLS_DIR is on the Docker host, for messages only [none]
#   FEDMUD_STATE_DB      SuperLink state database file; keeps registered nodes across restarts [in memory]
#   SUPERLINK_FLEET      address SuperNodes dial [superlink:9092]
#   SUPERLINK_CONTROL    address the run submitter and `register` dial [superlink:9093]
#   PARTITION_ID         SuperNode's partition [claimed in FEDMUD_PARTITION_CLAIMS]
#   NUM_PARTITIONS       SuperNode's num-partitions [FEDMUD_CLIENTS]
#   FEDMUD_PARTITION_CLAIMS  directory shared by the SuperNode replicas of one Compose service, in
#                        which each claims the lowest free partition; the SuperLink empties it [none]
#   FEDMUD_CLIENTS       number of SuperNodes = partitions = nodes trained per round [2]
#   FEDMUD_PRESET        run-config preset in configs/ (or a .toml path; empty for none) [smoke]
#   FEDMUD_ROUNDS        num-server-rounds, overriding the preset [preset's]
#   FEDMUD_RUN_CONFIG    more run-config overrides, 'key=value key="text" ...' [none]
#   FEDMUD_RESULTS       run-dir: the ServerApp writes <timestamp>/ under it [/results]
#   FEDMUD_DONE_FILE     marker the submitter writes when the run has ended; the SuperLink and the
#                        SuperNodes stop when it appears, so the whole stack ends with the run [none]
set -euo pipefail

log() { printf '[fedmud %s] %s\n' "$ROLE" "$*" >&2; }
# Paths the caller gave, made absolute against the caller's directory (before the cd below).
absolute() { if [[ -z $1 || $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi; }

CLIENTS=${FEDMUD_CLIENTS:-2}
RESULTS=$(absolute "${FEDMUD_RESULTS:-/results}")
TLS_DIR=$(absolute "${FEDMUD_TLS_DIR:-}")
export FEDMUD_TLS_DIR=$TLS_DIR
[[ -n ${FEDMUD_NODE_KEY:-} ]] && export FEDMUD_NODE_KEY=$(absolute "$FEDMUD_NODE_KEY")
[[ -n ${FEDMUD_STATE_DB:-} ]] && export FEDMUD_STATE_DB=$(absolute "$FEDMUD_STATE_DB")
[[ -n ${FEDMUD_PARTITION_CLAIMS:-} ]] && export FEDMUD_PARTITION_CLAIMS=$(absolute "$FEDMUD_PARTITION_CLAIMS")
[[ -n ${FEDMUD_DONE_FILE:-} ]] && export FEDMUD_DONE_FILE=$(absolute "$FEDMUD_DONE_FILE")
ARGS=()
for arg in "${@:2}"; do  # register's key files
  if [[ ${1:-} == register && $arg != -* ]]; then ARGS+=("$(absolute "$arg")"); else ARGS+=("$arg"); fi
done
cd "$(dirname "$(readlink -f "$0")")/.."

# The certificate and key checks of deploy/preflight.py; exit 2 with its message on a problem.
preflight() { python deploy/preflight.py "$@" || exit 2; }

# Run a long-lived Flower process; when FEDMUD_DONE_FILE appears, stop it and exit 0.
run_until_done() {
  if [[ -z ${FEDMUD_DONE_FILE:-} ]]; then exec "$@"; fi
  "$@" &
  local pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
  while kill -0 "$pid" 2>/dev/null; do
    if [[ -e $FEDMUD_DONE_FILE ]]; then
      log "the run has ended ($(cat "$FEDMUD_DONE_FILE")); stopping"
      kill -TERM "$pid" 2>/dev/null || true
      # flower-supernode 1.39 can log "terminated gracefully" and keep retrying the (gone)
      # SuperLink in another thread: give it 10 s, then kill it.
      for _ in {1..10}; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" || true
      exit 0
    fi
    sleep 2
  done
  wait "$pid"
}

# The Fleet transport is named, not left to Flower's default: gRPC (request-response). Flower 1.40+
# has no gRPC SuperNode (it refuses --grpc-rere), so a wrong Flower stops here instead of dialling
# :9092 over HTTP; pyproject.toml pins 1.39 for this reason (README, "Flower version").
superlink() {
  local args=(--isolation subprocess --disable-runtime-dependency-installation
              --host 0.0.0.0 --port 9093 --fleet-api-type grpc-rere --fleet-api-address 0.0.0.0:9092)
  if [[ -n $TLS_DIR ]]; then
    args+=(--ssl-ca-certfile "$TLS_DIR/ca.crt" --ssl-certfile "$TLS_DIR/server.pem" --ssl-keyfile "$TLS_DIR/server.key")
  else
    args+=(--insecure)
  fi
  [[ ${FEDMUD_NODE_AUTH:-0} == 1 ]] && args+=(--enable-supernode-auth)
  if [[ -n ${FEDMUD_STATE_DB:-} ]]; then
    mkdir -p "$(dirname "$FEDMUD_STATE_DB")"
    args+=(--database "$FEDMUD_STATE_DB")
  fi
  # A new stack, a new run: forget the last run's end and partition claims.
  [[ -n ${FEDMUD_DONE_FILE:-} ]] && rm -f "$FEDMUD_DONE_FILE"
  [[ -n ${FEDMUD_PARTITION_CLAIMS:-} ]] && rm -rf "$FEDMUD_PARTITION_CLAIMS"
  preflight superlink
  mkdir -p "$RESULTS"
  cd "$RESULTS"  # a relative run-dir lands in the results volume too
  run_until_done flower-superlink "${args[@]}" "$@"
}

# deploy/compose.client.yml passes the client host's settings through, empty where not set.
client_host_settings() {
  local missing=() name
  [[ -n ${SUPERLINK_FLEET:-} ]] || missing+=("SUPERLINK (the SuperLink's Fleet address, host:9092)")
  [[ -n ${PARTITION_ID:-} ]] || missing+=("PARTITION_ID (this node's partition, 0..NUM_PARTITIONS-1)")
  [[ -n ${NUM_PARTITIONS:-} ]] || missing+=("NUM_PARTITIONS (the number of SuperNodes of the run)")
  [[ -n ${NODE_KEY:-} ]] || missing+=("NODE_KEY (this node's private key inside FEDMUD_CERTS_DIR, e.g. keys/node-0)")
  if ((${#missing[@]})); then
    for name in "${missing[@]}"; do log "ERROR: set $name when starting deploy/compose.client.yml"; done
    exit 2
  fi
  export FEDMUD_NODE_KEY=$TLS_DIR/$NODE_KEY
}

supernode() {
  local partitions partition
  [[ ${FEDMUD_CLIENT_HOST:-0} == 1 ]] && client_host_settings
  partitions=${NUM_PARTITIONS:-$CLIENTS}
  preflight supernode
  partition=$(python deploy/fedmud_deploy.py partition-id "$partitions")
  log "partition-id=$partition num-partitions=$partitions"
  local args=(--grpc-rere --superlink "${SUPERLINK_FLEET:-superlink:9092}" --isolation subprocess
              --node-config "partition-id=$partition num-partitions=$partitions")
  if [[ -n $TLS_DIR ]]; then args+=(--root-certificates "$TLS_DIR/ca.crt"); else args+=(--insecure); fi
  [[ -n ${FEDMUD_NODE_KEY:-} ]] && args+=(--auth-supernode-private-key "$FEDMUD_NODE_KEY")
  run_until_done flower-supernode "${args[@]}" "$@"
}

# The flwr CLI's connection "fedmud" to the SuperLink's Control API (other connections in
# $FLWR_HOME/config.toml are kept), after checking ca.crt against the SuperLink's certificate.
write_connection() {
  local security=(--insecure)
  [[ -n $TLS_DIR ]] && security=(--root-certificates "$TLS_DIR/ca.crt")
  preflight cli
  python deploy/fedmud_deploy.py connection fedmud "${SUPERLINK_CONTROL:-superlink:9093}" "${security[@]}"
}

register() {
  [[ $# -gt 0 ]] || { log "usage: register KEY.pub ... (the SuperNodes' public keys)"; exit 2; }
  preflight pubkeys "$@"
  write_connection
  local key
  for key in "$@"; do
    flwr supernode register "$key" fedmud --name "$(basename "$key" .pub)"
  done
}

RUN_OUTCOME=failed
submit() {
  tmp=$(mktemp -d)
  # Always tell the stack that the run has ended, whatever happened here.
  trap 'rm -rf "$tmp"; if [[ -n ${FEDMUD_DONE_FILE:-} ]]; then echo "$RUN_OUTCOME" > "$FEDMUD_DONE_FILE"; fi' EXIT
  write_connection

  local overrides=("num-partitions=$CLIENTS min-train-nodes=$CLIENTS run-dir=\"$RESULTS\"")
  [[ -n ${FEDMUD_ROUNDS:-} ]] && overrides+=("num-server-rounds=$FEDMUD_ROUNDS")
  [[ -n ${FEDMUD_RUN_CONFIG:-} ]] && overrides+=("$FEDMUD_RUN_CONFIG")
  log "run config: $(python deploy/fedmud_deploy.py run-config "$tmp/run-config.toml" "${FEDMUD_PRESET-smoke}" "${overrides[@]}")"

  flwr run . fedmud --stream -c "$tmp/run-config.toml" "$@" 2>&1 | tee "$tmp/run.log"
  local run_id run_dir
  run_id=$(sed -n 's/.*Successfully started run \([0-9]\+\).*/\1/p' "$tmp/run.log" | head -1)
  [[ -n $run_id ]] || { log "the run was not started"; exit 1; }
  flwr ls fedmud --run-id "$run_id" --format json > "$tmp/flwr-ls.json"
  log "flwr ls: $(python -c 'import json,sys; r=json.load(sys.stdin)["runs"][0]; print(r["status"], r["network-traffic"])' < "$tmp/flwr-ls.json")"
  grep -q '"status": "finished:completed"' "$tmp/flwr-ls.json" || { log "run $run_id did not complete"; exit 1; }

  run_dir=$(sed -n 's/.*FINAL results in \([^ ]*\).*/\1/p' "$tmp/run.log" | tail -1 | tr -d '\r')
  if [[ -z $run_dir ]]; then  # the newest run directory (no `ls | head`: no SIGPIPE under pipefail)
    local summary newest=""
    for summary in "$RESULTS"/*/summary.json; do
      [[ -e $summary && ( -z $newest || $summary -nt $newest ) ]] && newest=$summary
    done
    [[ -n $newest ]] || { log "no summary.json under $RESULTS"; exit 1; }
    run_dir=$(dirname "$newest")
  fi
  [[ $run_dir == /* ]] || run_dir=$RESULTS/$run_dir
  cp "$tmp/run.log" "$run_dir/run.log"
  cp "$tmp/flwr-ls.json" "$run_dir/flwr-ls.json"
  python deploy/fedmud_deploy.py traffic "$run_dir/flwr-ls.json" "$run_dir" || log "see $run_dir/traffic.json"
  log "run $run_id completed; results in $run_dir"
  RUN_OUTCOME=completed
}

ROLE=${1:-help}
set -- ${ARGS[@]+"${ARGS[@]}"}
case $ROLE in
  superlink) superlink "$@" ;;
  supernode) supernode "$@" ;;
  run) submit "$@" ;;
  register) register "$@" ;;
  flwr) write_connection; exec flwr "$@" ;;
  preflight)
    [[ ${1:-} == supernode && ${FEDMUD_CLIENT_HOST:-0} == 1 ]] && client_host_settings
    preflight "$@" ;;
  tensorboard) exec tensorboard --logdir "$RESULTS" --bind_all --port 6006 "$@" ;;
  help|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) exec "$ROLE" "$@" ;;
esac
