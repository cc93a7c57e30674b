#!/usr/bin/env bash
# Multi-machine rehearsal on one host, with the bare-metal commands of docs/deployment.md ("Without
# containers") run as written in a scratch copy of the project. Each "machine" is a network
# namespace of its own, joined by a bridge that lives in a further namespace, on a private subnet
# (default 10.231.0.0/24); in each, fl.example.org (the docs' server name) resolves to the SuperLink
# through /etc/netns/<namespace>/hosts. The host's own network is not touched and no traffic leaves
# the namespaces this script creates.
#
#   superlink  10.231.0.1   block bare-superlink: TLS and SuperNode authentication
#   admin      10.231.0.2   blocks bare-register, bare-ls, bare-run (the flwr CLI)
#   node-0     10.231.0.10  block bare-supernode as written: partition 0, registered key
#   node-1     10.231.0.11  the same with node-1's key and partition 1
#   rogue      10.231.0.12  the same with a valid trust root but an UNREGISTERED key (node-2)
#
# Passes when the run completes over TLS with node-0 and node-1, the SuperLink refuses the rogue and
# a plaintext CLI, `flwr supernode ls` lists the two nodes, and a SuperNode with a missing or wrong
# ca.crt stops with the preflight message. With RESTART=1 (the default; needs ROUNDS >= 4) it also
# kills node-1 (SIGKILL, every process in its namespace) while it trains in round 2, requires the
# ServerApp to log "round 2: node <node-1's id> failed", restarts it and requires its upload to be
# merged in the first round it is sent a model again; then restarts node-1 gracefully (SIGTERM)
# right after its next upload and requires the same of its next round (it lost the model it held).
# Everything it creates (namespaces, their /etc/netns entries, the processes in them, a temporary
# directory) is removed on exit, failure included; set KEEP=1 to keep the directory with the logs.
#
#   scripts/netns-smoke.sh                      # as root (re-runs itself with sudo if it can)
#   ROUNDS=3 RESTART=0 SUBNET=10.231.7 scripts/netns-smoke.sh
#   RESTART=0 ROUNDS=3 FEDMUD_RUN_CONFIG='local-epochs=1 secure-aggregation=true' scripts/netns-smoke.sh
set -euo pipefail
if [[ $(id -u) != 0 ]]; then
  if command -v sudo >/dev/null; then
    exec sudo --preserve-env=ROUNDS,RESTART,SUBNET,TIMEOUT,KEEP,VENV,FEDMUD_RUN_CONFIG "$0" "$@"
  fi
  echo "netns-smoke: needs root (ip netns); run it as root" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
. deploy/smoke-lib.sh

VENV=${VENV:-$ROOT/.venv}
[[ -x $VENV/bin/flower-superlink ]] || { echo "netns-smoke: no Flower in $VENV (set VENV)" >&2; exit 2; }
export PATH=$VENV/bin:$PATH FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

SUBNET=${SUBNET:-10.231.0}
RESTART=${RESTART:-1}
FEDMUD_RUN_CONFIG=${FEDMUD_RUN_CONFIG:-local-epochs=1}
if [[ $RESTART == 1 && $FEDMUD_RUN_CONFIG == *secure-aggregation=true* ]]; then
  # the kill waits for node-1's second message, which under SecAgg+ (4 a round) is round 1's key
  # exchange, and the restart waits for a per-node failure line that secure rounds do not log
  echo "netns-smoke: RESTART=1 is the plain rounds' scenario; with secure-aggregation=true use RESTART=0" >&2
  exit 2
fi
ROUNDS=${ROUNDS:-$([[ $RESTART == 1 ]] && echo 4 || echo 2)}
TIMEOUT=${TIMEOUT:-1800}
[[ $RESTART != 1 || $ROUNDS -ge 4 ]] || { echo "netns-smoke: RESTART=1 needs ROUNDS >= 4" >&2; exit 2; }
tag=fm$$                                  # namespace names unique to this invocation
declare -A ADDR=([superlink]=$SUBNET.1 [admin]=$SUBNET.2 [node-0]=$SUBNET.10 [node-1]=$SUBNET.11 [rogue]=$SUBNET.12)
HOSTS=(superlink admin node-0 node-1 rogue)
SWITCH=${tag}-sw
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmud-netns.XXXXXX")
TREE=$WORK/tree
chmod 755 "$WORK"

say() { printf '[netns-smoke %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
ns() { echo "${tag}-$1"; }
NETNS_LIST=$WORK/netns.list
ns_exists() { ip netns list >"$NETNS_LIST"; grep -qw -- "$1" "$NETNS_LIST"; }  # a file, not a pipe
ns_pids() { if ns_exists "$(ns "$1")"; then ip netns pids "$(ns "$1")"; fi; }

# stop_host NAME SIGNAL SECONDS: SIGNAL to every process in NAME's namespace; SIGKILL what is left
# after SECONDS.
stop_host() {
  local name=$1 signal=$2 limit=$3 pids start=$SECONDS
  pids=$(ns_pids "$name")
  [[ -n $pids ]] && kill "-$signal" $pids 2>/dev/null || true
  while ((SECONDS - start < limit)); do
    [[ -z $(ns_pids "$name") ]] && return 0
    sleep 0.5
  done
  pids=$(ns_pids "$name")
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
  sleep 0.5
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local name
  for name in "${HOSTS[@]}"; do stop_host "$name" TERM 10; done
  for name in "${HOSTS[@]}" sw; do
    ns_exists "${tag}-$name" && ip netns delete "${tag}-$name"
    rm -rf "/etc/netns/${tag}-$name"
  done
  if [[ ${KEEP:-0} == 1 || $status != 0 ]]; then
    echo "[netns-smoke] logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
T0=$SECONDS

copy_tree "$TREE"
cd "$TREE"

# --- the network: one bridge in its own namespace, one veth per host namespace ---------------------
ip netns add "$SWITCH"
ip -n "$SWITCH" link add br0 type bridge
ip -n "$SWITCH" link set br0 up
for name in "${HOSTS[@]}"; do
  ip netns add "$(ns "$name")"
  mkdir -p "/etc/netns/$(ns "$name")"  # `ip netns exec` mounts this hosts file over /etc/hosts
  printf '127.0.0.1 localhost\n%s fl.example.org\n' "${ADDR[superlink]}" >"/etc/netns/$(ns "$name")/hosts"
  ip -n "$(ns "$name")" link set lo up
  ip -n "$SWITCH" link add "v-$name" type veth peer name eth0 netns "$(ns "$name")"
  ip -n "$SWITCH" link set "v-$name" master br0 up
  ip -n "$(ns "$name")" addr add "${ADDR[$name]}/24" dev eth0
  ip -n "$(ns "$name")" link set eth0 up
done
say "namespaces up on $SUBNET.0/24: $(for n in "${HOSTS[@]}"; do printf '%s=%s ' "$n" "${ADDR[$n]}"; done); fl.example.org = ${ADDR[superlink]}"

# --- credentials: the docs' command, plus a key pair for the rogue --------------------------------
doc certs >"$WORK/certs.log" 2>&1 || { cat "$WORK/certs.log"; exit 1; }
scripts/make-certs.sh -o deploy/certs -n 3 >/dev/null   # node-2: the rogue's key, never registered
say "block 'certs': CA, server certificate for superlink, fl.example.org, 192.0.2.10; keys node-0, node-1, node-2 (rogue)"

# on HOST BLOCK LOG [--sub OLD NEW]...: docs block BLOCK in HOST's namespace, in the foreground,
# output in $WORK/LOG.log; its exit status.
on() {
  local host=$1 block=$2 log=$WORK/$3.log text
  shift 3
  text=$(doc_text "$block" "$@") || return 1
  mkdir -p "$WORK/home-$host"
  ip netns exec "$(ns "$host")" env FLWR_HOME="$WORK/home-$host" bash -euo pipefail -c "$text" >"$log" 2>&1
}
# start HOST BLOCK LOG [--sub OLD NEW]...: the same in the background (its processes are found by
# namespace, `ip netns pids`).
start() {
  local host=$1 block=$2 log=$WORK/$3.log text
  shift 3
  text=$(doc_text "$block" "$@") || return 1
  mkdir -p "$WORK/home-$host"
  ip netns exec "$(ns "$host")" env FLWR_HOME="$WORK/home-$host" bash -euo pipefail -c "$text" >"$log" 2>&1 &
  disown $!  # no job-control notice when the smoke test kills it
}
reachable() {  # reachable HOST PORT: a TCP connection from the admin namespace
  ip netns exec "$(ns admin)" python -c "import socket,sys; socket.create_connection(('$1', $2), 1).close()" 2>/dev/null
}

# --- SuperLink: TLS on every API, SuperNode authentication on (block bare-superlink) --------------
start superlink bare-superlink superlink
wait_for 120 "SuperLink listening" reachable fl.example.org 9093
wait_for 60 "Fleet API listening" reachable fl.example.org 9092
say "SuperLink up (block 'bare-superlink': TLS, --enable-supernode-auth)"

# A plaintext client must not get through: the Control API speaks TLS only.
mkdir -p "$WORK/home-plaintext"
printf '[superlink]\ndefault = "p"\n\n[superlink.p]\naddress = "fl.example.org:9093"\ninsecure = true\n' \
  >"$WORK/home-plaintext/config.toml"
if ip netns exec "$(ns admin)" env FLWR_HOME="$WORK/home-plaintext" flwr ls p >"$WORK/plaintext.log" 2>&1; then
  say "FAIL: a plaintext (insecure) flwr CLI reached the Control API"; exit 1
fi
say "plaintext CLI refused by the TLS-only Control API: $(sed 's/[│╭╮╰╯─]//g' "$WORK/plaintext.log" | tr -s ' \n' ' ' | cut -c1-160)"

on admin bare-register register || { say "FAIL: block 'bare-register'"; cat "$WORK/register.log"; exit 1; }
say "block 'bare-register': node-0 and node-1 registered (the rogue's key, node-2, is not)"
on admin bare-ls ls || { say "FAIL: block 'bare-ls'"; cat "$WORK/ls.log"; exit 1; }
NODE_ROW='│ *[0-9]{6,} *│'
[[ $(count "$WORK/ls.log" "$NODE_ROW") == 2 ]] || { say "FAIL: block 'bare-ls' does not list 2 nodes:"; cat "$WORK/ls.log"; exit 1; }
say "block 'bare-ls' lists the 2 registered nodes"

# --- a SuperNode with a missing or another CA's ca.crt: the preflight message, exit status 2 ------
scripts/make-certs.sh -o "$WORK/other-ca" superlink >/dev/null
mkdir -p "$WORK/no-ca" "$WORK/wrong-ca"
cp "$WORK/other-ca/ca.crt" "$WORK/wrong-ca/"
for case in no-ca wrong-ca; do
  status=0
  on node-0 bare-supernode "$case" --sub FEDMUD_TLS_DIR=deploy/certs "FEDMUD_TLS_DIR=$WORK/$case" || status=$?
  case $case in
    no-ca) expect="ERROR: the CA certificate $WORK/no-ca/ca.crt does not exist" ;;
    wrong-ca) expect="ERROR: the CA certificate $WORK/wrong-ca/ca.crt does not verify the certificate of the SuperLink at fl.example.org:9092" ;;
  esac
  [[ $status == 2 ]] && has "$WORK/$case.log" "$expect" ||
    { say "FAIL: SuperNode with $case: exit $status, not the preflight message:"; tail -n 20 "$WORK/$case.log"; exit 1; }
  say "SuperNode with $case: $(first "$WORK/$case.log" 'preflight\] ERROR' | cut -c1-200)..."
done

# --- the SuperNodes (block bare-supernode as written for node-0; key and partition for the others) -
start node-0 bare-supernode node-0
start node-1 bare-supernode node-1 --sub node-0 node-1 --sub PARTITION_ID=0 PARTITION_ID=1
start rogue bare-supernode rogue --sub node-0 node-2

refused() {
  has "$WORK/rogue.log" "Failed to activate SuperNode" &&
    has "$WORK/superlink.log" "ActivateNode.*No SuperNode found with the given public key"
}
wait_for 120 "the rogue SuperNode's refusal" refused
say "rogue refused. SuperLink log: $(first "$WORK/superlink.log" 'ActivateNode.*No SuperNode found' |
  sed 's/public key: .*exception:/public key: <rogue.pub>, exception:/')"
say "rogue's log: $(first "$WORK/rogue.log" 'Failed to activate SuperNode')"
node_id() { sed -n 's/.*SuperNode ID: \([0-9][0-9]*\).*/\1/p' "$1" >"$1.id"; sed -n '1p' "$1.id"; }
wait_for 120 "node-1's SuperNode ID" has "$WORK/node-1.log" "SuperNode ID"
NODE1=$(node_id "$WORK/node-1.log")
say "node-1 is node $NODE1"

# --- the run, submitted by the admin over TLS (block bare-run: ROUNDS rounds of the smoke preset) --
t_run=$SECONDS
text=$(doc_text bare-run --sub FEDMUD_ROUNDS=10 "FEDMUD_ROUNDS=$ROUNDS" --sub FEDMUD_PRESET=paper-mnist FEDMUD_PRESET=smoke)
mkdir -p "$WORK/home-admin"
# In the background with `wait`, so that a signal to this script interrupts the wait and cleans up.
ip netns exec "$(ns admin)" env FLWR_HOME="$WORK/home-admin" FEDMUD_RUN_CONFIG="$FEDMUD_RUN_CONFIG" \
  timeout "$TIMEOUT" bash -euo pipefail -c "$text" >"$WORK/run.log" 2>&1 &
run_pid=$!

FAILURES=()
restart_node1() {  # restart_node1 LOG: block bare-supernode for node-1 again, until it is activated
  local log=$1 try
  for try in 1 2 3 4 5 6; do
    start node-1 bare-supernode "$log" --sub node-0 node-1 --sub PARTITION_ID=0 PARTITION_ID=1
    if wait_for 60 "node-1 activated again" has "$WORK/$log.log" "SuperNode ID|Failed to activate"; then
      has "$WORK/$log.log" "SuperNode ID" && return 0
    fi
    stop_host node-1 TERM 10  # not yet offline at the SuperLink: try again
    sleep 5
  done
  say "FAIL: node-1 did not come back"; return 1
}
server_logged() { has "$WORK/run.log" "$1" || has "$WORK/superlink.log" "$1"; }
if [[ $RESTART == 1 ]]; then
  # A: a crash while training. The SuperLink notices when node-1's heartbeat lapses (up to about a
  # minute); the ServerApp must name node-1's own id, not the SuperLink's.
  wait_for "$TIMEOUT" "node-1 receiving its round-2 model" eval '(( $(count "$WORK/node-1.log" "Receiving: .*message") >= 2 ))'
  stop_host node-1 KILL 5
  say "A: killed node-1 (SIGKILL) while it trains in round 2"
  wait_for 300 "the ServerApp logging a failed node in round 2" server_logged "round 2: node [0-9]+ failed"
  line=$(first "$WORK/run.log" "round 2: node [0-9]+ failed")
  [[ -n $line ]] || line=$(first "$WORK/superlink.log" "round 2: node [0-9]+ failed")
  if [[ $line == *"node $NODE1 failed"* ]]; then
    say "A: PASS the ServerApp names node-1: ${line##*WARNING : }"
  else
    say "A: FAIL the ServerApp does not name node-1 ($NODE1): ${line##*WARNING : }"; FAILURES+=("A: failed-node id")
  fi
  restart_node1 node-1.restart1
  say "A: node-1 restarted: node $(node_id "$WORK/node-1.restart1.log")"
  # B: a graceful restart right after an upload: the ServerApp still thinks node-1 holds the model.
  wait_for "$TIMEOUT" "restarted node-1 sending its first reply" has "$WORK/node-1.restart1.log" "Sent successfully"
  stop_host node-1 TERM 20
  say "B: stopped node-1 (SIGTERM) right after its first upload back; restarting it"
  restart_node1 node-1.restart2
fi

run_status=0
wait "$run_pid" || run_status=$?
sed 's/\x1b\[[0-9;]*m//g' "$WORK/run.log" >"$WORK/run.plain"
grep -E "round [0-9]+: (accuracy|node)|could not sync|FINAL|completed|run config" "$WORK/run.plain" || true
[[ $run_status == 0 ]] || { say "FAIL: the run exited with $run_status (see $WORK/run.log)"; exit 1; }
say "run completed over TLS in $((SECONDS - t_run))s (block 'bare-run')"

# --- what the SuperLink saw ------------------------------------------------------------------------
activated=$(count "$WORK/superlink.log" "Fleet.ActivateNode\] Activated")
expected=$([[ $RESTART == 1 ]] && echo 4 || echo 2)
[[ $activated == "$expected" ]] || { say "FAIL: $activated SuperNode activations, expected $expected"; exit 1; }
has "$WORK/rogue.log" "SuperNode ID" && { say "FAIL: the rogue SuperNode got a node id"; exit 1; }
run_dir=$(newest_run results/server)
[[ -n $run_dir ]] || { say "FAIL: no summary.json under results/server"; exit 1; }
check_run "$run_dir" "$ROUNDS" "$WORK/check.log" netns-smoke

if [[ $RESTART == 1 ]]; then
  # A: merged in the first round node-1 was sent a model after the crash (round 2)?
  if python deploy/fedmud_deploy.py rejoined "$run_dir" "$NODE1" 2 >"$WORK/rejoin-a.log" 2>&1; then
    say "A: PASS $(cat "$WORK/rejoin-a.log")"
  else
    say "A: FAIL $(tr '\n' ' ' <"$WORK/rejoin-a.log")"; FAILURES+=("A: contribution after the crash")
  fi
  back=$(sed -n 's/.*back in round \([0-9]*\).*/\1/p' "$WORK/rejoin-a.log")
  # B: merged in the first round after the one node-1 had just uploaded in when it was restarted?
  if [[ -n $back ]] && python deploy/fedmud_deploy.py rejoined "$run_dir" "$NODE1" "$back" >"$WORK/rejoin-b.log" 2>&1; then
    say "B: PASS $(cat "$WORK/rejoin-b.log")"
  else
    say "B: FAIL $(tr '\n' ' ' <"$WORK/rejoin-b.log" 2>/dev/null)"; FAILURES+=("B: contribution after the graceful restart")
  fi
  if ((${#FAILURES[@]})); then
    say "FAIL: the run completed, but: $(printf '%s; ' "${FAILURES[@]}")"; exit 1
  fi
fi
say "PASS: the docs' bare-metal commands: TLS run with 2 registered SuperNodes, unregistered SuperNode refused$([[ $RESTART == 1 ]] && echo ', node-1 crashed and restarted twice and contributed in its first round back each time')"
