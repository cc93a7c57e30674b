#!/usr/bin/env bash
# Rehearsal of the multi-machine Compose set-up on one Docker host, with the commands of
# docs/deployment.md ("Several machines", steps 1-5) run as written in a scratch copy of the
# project: deploy/compose.server.yml and three projects of deploy/compose.client.yml (two
# registered SuperNodes and one whose key is not registered). The "Internet" is the server
# project's network, which the client projects join, with fl.example.org as the SuperLink's name on
# it: a `docker` wrapper early on PATH adds these two overlay files to the docs' Compose commands.
#
# Passes when: the run completes over TLS with the two registered SuperNodes; the rogue is refused;
# `admin flwr supernode ls fedmud` lists the two nodes; `down` keeps the registrations and `down -v`
# deletes them; no Compose command tries to pull the locally built image; and SuperNodes, the CLI
# and the SuperLink started with a missing or wrong CA certificate stop with the preflight message
# naming the file. Removes its containers, networks, volumes and images on exit, failure included
# (KEEP=1 keeps the scratch directory with the logs); keeps the build cache.
#
#   deploy/multihost-compose-smoke.sh        # needs Docker with Compose v2, openssl, ssh-keygen
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/smoke-lib.sh

tag=fmmh$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmud-multihost.XXXXXX")
TREE=$WORK/tree LOGS=$WORK/logs
mkdir -p "$LOGS"
say() { printf '[multihost-smoke %3ds] %s\n' "$SECONDS" "$*"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
REAL_DOCKER=$(command -v docker)
PROJECTS=(server node-0 node-1 rogue no-ca wrong-ca bad-link)

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -d $TREE ]]; then
    cd "$TREE"
    local name file
    for name in "${PROJECTS[@]}"; do
      file=deploy/compose.client.yml
      [[ $name == server || $name == bad-link ]] && file=deploy/compose.server.yml
      "$REAL_DOCKER" compose -p "$tag-$name" -f "$file" --profile admin down --volumes --remove-orphans --timeout 5 \
        >/dev/null 2>&1 || true
    done
    cd /
  fi
  "$REAL_DOCKER" image rm "$FEDMUD_IMAGE" >/dev/null 2>&1 || true
  # Compose labels what it builds with the project's name, so each project's build is an image of
  # its own that lost the tag to the next one: remove those (the layers stay cached).
  for name in "${PROJECTS[@]}"; do
    "$REAL_DOCKER" image prune --force --filter "label=com.docker.compose.project=$tag-$name" >/dev/null 2>&1 || true
  done
  if [[ $status == 0 && ${KEEP:-0} != 1 ]]; then rm -rf "$WORK"; else echo "[multihost-smoke] files kept in $WORK" >&2; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# An image tag of its own that exists in no registry: a Compose file that tried to pull it would fail.
export FEDMUD_IMAGE=fedmud-smoke:$tag
# Publish on loopback, on free ports: nothing outside this host is involved.
export FLEET_BIND=127.0.0.1 FLEET_PORT=$(free_port) CONTROL_PORT=$(free_port)
export FEDMUD_RUN_CONFIG=local-epochs=1

copy_tree "$TREE"
cd "$TREE"
mkdir -p "$WORK/bin"
printf 'services:\n  superlink:\n    networks:\n      default:\n        aliases: [fl.example.org]\n' >"$WORK/server-net.yml"
printf 'networks:\n  default:\n    name: %s-server_default\n    external: true\n' "$tag" >"$WORK/client-net.yml"
cat >"$WORK/bin/docker" <<EOF
#!/usr/bin/env bash
# multihost-compose-smoke: the test host's "Internet" and DNS for the docs' Compose commands.
args=()
for arg in "\$@"; do
  args+=("\$arg")
  case \$arg in
    deploy/compose.server.yml) args+=(-f "$WORK/server-net.yml") ;;
    deploy/compose.client.yml) args+=(-f "$WORK/client-net.yml") ;;
  esac
done
exec "$REAL_DOCKER" "\${args[@]}"
EOF
chmod +x "$WORK/bin/docker"
export PATH=$WORK/bin:$PATH
say "project copied to $TREE; image tag $FEDMUD_IMAGE; SuperLink on 127.0.0.1:$FLEET_PORT (Fleet), :$CONTROL_PORT (Control)"

# step LOG NAME [--sub OLD NEW]...: run docs block NAME with its output in $LOGS/LOG.log.
step() {
  local log=$LOGS/$1.log status=0
  shift
  doc "$@" >"$log" 2>&1 || status=$?
  if [[ $status != 0 ]]; then say "FAIL: docs block '$1' exited with $status; its output ($log):"; tail -n 30 "$log"; fi
  return "$status"
}
as() { export COMPOSE_PROJECT_NAME=$tag-$1; }  # the "host" (Compose project) the next commands run on

# --- 1. credentials -----------------------------------------------------------------------------
step certs certs
scripts/make-certs.sh -o deploy/certs -n 3 >/dev/null  # one more key pair, node-2: the rogue's (never registered)
say "credentials made (block 'certs'): server certificate for superlink, fl.example.org, 192.0.2.10; keys node-0..2"

# --- 2. server host ------------------------------------------------------------------------------
as server
step server-up server-up
step register server-register
say "SuperLink up (block 'server-up', TLS, SuperNode authentication); node-0, node-1 registered (block 'server-register')"
step server-ls server-ls
NODE_ROW='│ *[0-9]{6,} *│'  # a row of the `flwr supernode ls` table
listed=$(count "$LOGS/server-ls.log" "$NODE_ROW")
[[ $listed == 2 ]] || { say "FAIL: 'admin flwr supernode ls fedmud' does not list node-0 and node-1:"; cat "$LOGS/server-ls.log"; exit 1; }
say "block 'server-ls' lists the 2 registered nodes: $(first "$LOGS/server-ls.log" "$NODE_ROW" | tr -s ' ')..."

# --- the preflight checks: SuperNodes, the CLI and a SuperLink with a missing or wrong CA --------
scripts/make-certs.sh -o "$WORK/other-ca" superlink >/dev/null   # another federation's CA
mkdir -p "$WORK/no-ca/keys" "$WORK/wrong-ca/keys" "$WORK/bad-link"
cp deploy/certs/keys/node-0 "$WORK/no-ca/keys/"
cp deploy/certs/keys/node-0 "$WORK/wrong-ca/keys/"
cp "$WORK/other-ca/ca.crt" "$WORK/wrong-ca/"
cp "$WORK/other-ca/ca.crt" deploy/certs/server.pem deploy/certs/server.key "$WORK/bad-link/"
preflight_error() {  # preflight_error PROJECT LOG ERE: the client project's log has that ERROR line
  "$REAL_DOCKER" compose -p "$tag-$1" -f deploy/compose.client.yml logs --no-log-prefix >"$LOGS/$2.log" 2>&1 || true
  has "$LOGS/$2.log" "$3"
}
for case in no-ca wrong-ca; do
  as "$case"
  FEDMUD_CERTS_DIR=$WORK/$case step "$case-up" client-up
done
wait_for 90 "the SuperNode without ca.crt stopping with the preflight message" \
  preflight_error no-ca no-ca "ERROR: the CA certificate /certs/ca.crt \(on the host: $WORK/no-ca/ca.crt, in FEDMUD_CERTS_DIR\) does not exist"
say "SuperNode container without ca.crt: $(first "$LOGS/no-ca.log" 'preflight\] ERROR' | cut -c1-220)..."
wait_for 90 "the SuperNode with another CA's ca.crt stopping with the preflight message" \
  preflight_error wrong-ca wrong-ca "ERROR: the CA certificate /certs/ca.crt .* does not verify the certificate of the SuperLink at fl.example.org:9092"
say "SuperNode container with another CA: $(first "$LOGS/wrong-ca.log" 'preflight\] ERROR' | cut -c1-220)..."
for case in no-ca wrong-ca; do
  as "$case"
  step "$case-down" client-down
done
as server
status=0
FEDMUD_CERTS_DIR=$WORK/wrong-ca docker compose -f deploy/compose.server.yml run --rm --no-deps admin flwr ls fedmud \
  >"$LOGS/cli-wrong-ca.log" 2>&1 || status=$?
[[ $status == 2 ]] && has "$LOGS/cli-wrong-ca.log" "ERROR: the CA certificate /certs/ca.crt .* does not verify the certificate of the SuperLink at superlink:9093" ||
  { say "FAIL: the CLI with a wrong CA (exit $status) did not stop with the preflight message:"; tail -n 20 "$LOGS/cli-wrong-ca.log"; exit 1; }
say "admin CLI with another CA: $(first "$LOGS/cli-wrong-ca.log" 'preflight\] ERROR' | cut -c1-160)..."
status=0
FEDMUD_CERTS_DIR=$WORK/bad-link docker compose -p "$tag-bad-link" -f deploy/compose.server.yml run --rm --no-deps superlink \
  >"$LOGS/superlink-wrong-ca.log" 2>&1 || status=$?
[[ $status == 2 ]] && has "$LOGS/superlink-wrong-ca.log" "ERROR: the SuperLink certificate /certs/server.pem .* was not signed by the CA certificate /certs/ca.crt" ||
  { say "FAIL: the SuperLink with a mismatched CA (exit $status) did not stop with the preflight message:"; tail -n 20 "$LOGS/superlink-wrong-ca.log"; exit 1; }
say "SuperLink whose server.pem another CA signed: $(first "$LOGS/superlink-wrong-ca.log" 'preflight\] ERROR' | cut -c1-160)..."

# --- 3. client hosts: node-0 and node-1 as written (node-1 with its key and partition), the rogue -
as node-0
step node-0-up client-up
as node-1
step node-1-up client-up --sub node-0 node-1 --sub PARTITION_ID=0 PARTITION_ID=1
as rogue
step rogue-up client-up --sub node-0 node-2
refused() {
  "$REAL_DOCKER" compose -p "$tag-rogue" -f deploy/compose.client.yml logs --no-log-prefix >"$LOGS/rogue.log" 2>&1 || true
  has "$LOGS/rogue.log" "Failed to activate SuperNode"
}
wait_for 90 "the rogue SuperNode's refusal" refused
say "rogue refused: $(first "$LOGS/rogue.log" 'Failed to activate SuperNode')"
step rogue-down client-down  # it would keep restarting (restart: unless-stopped)

# --- 4. the run, from the server host (2 rounds of the smoke preset instead of 10 of paper-mnist) --
as server
t_run=$SECONDS
step run run --sub FEDMUD_ROUNDS=10 FEDMUD_ROUNDS=2 --sub FEDMUD_PRESET=paper-mnist FEDMUD_PRESET=smoke ||
  { say "FAIL: the run did not complete"; exit 1; }
sed 's/\x1b\[[0-9;]*m//g' "$LOGS/run.log" >"$LOGS/run.plain"
grep -E "round [0-9]+: accuracy|FINAL accuracy|bytes|completed" "$LOGS/run.plain" || true
say "run completed over TLS in $((SECONDS - t_run)) s (block 'run')"
step server-logs server-logs
activated=$(count "$LOGS/server-logs.log" "Fleet.ActivateNode\] Activated")
[[ $activated == 2 ]] || { say "FAIL: $activated SuperNodes activated, expected 2"; exit 1; }
run_dir=$(first "$LOGS/run.log" "FINAL results in" | sed 's/.*FINAL results in \([^ ]*\).*/\1/' | tr -d '\r')
host_dir=results/$tag-server/${run_dir#/results/}
[[ -n $run_dir && -f $host_dir/summary.json ]] ||
  { say "FAIL: no results in $host_dir (the default FEDMUD_RESULTS_DIR, results/<project>)"; exit 1; }
check_run "$host_dir" 2 "$LOGS/check.log" multihost-smoke

# --- the Control API from "another machine" (here the host, through the published loopback port) --
FLWR=${SMOKE_ROOT}/.venv/bin/flwr
if [[ -x $FLWR ]]; then
  mkdir -p "$WORK/remote"
  doc_text remote-config --sub fl.example.org:9093 "127.0.0.1:$CONTROL_PORT" --sub /path/to/ca.crt "$TREE/deploy/certs/ca.crt" \
    >"$WORK/remote/config.toml"
  PATH=$(dirname "$FLWR"):$PATH FLWR_HOME=$WORK/remote step remote-ls remote-ls
  [[ $(count "$LOGS/remote-ls.log" "$NODE_ROW") == 2 ]] || { say "FAIL: 'flwr supernode ls fedmud' with the docs' config.toml:"; cat "$LOGS/remote-ls.log"; exit 1; }
  say "blocks 'remote-config' + 'remote-ls' (CLI on the host, 127.0.0.1:$CONTROL_PORT): both nodes listed"
else
  say "note: no flwr in $SMOKE_ROOT/.venv, blocks 'remote-config'/'remote-ls' not checked"
fi

# --- 5. stopping: client logs and down; the server's down keeps the registrations, down -v not ---
as node-0
step node-0-logs client-logs
has "$LOGS/node-0-logs.log" "SuperNode ID" || { say "FAIL: block 'client-logs' does not show the SuperNode's log"; exit 1; }
step node-0-down client-down
as node-1
step node-1-down client-down
as server
step server-down server-down
"$REAL_DOCKER" volume inspect "$tag-server_state" >/dev/null 2>&1 || { say "FAIL: 'down' removed the state volume"; exit 1; }
step server-up-again server-up
step server-ls-again server-ls
[[ $(count "$LOGS/server-ls-again.log" "$NODE_ROW") == 2 ]] ||
  { say "FAIL: after down + up the registrations are gone:"; cat "$LOGS/server-ls-again.log"; exit 1; }
say "block 'server-down' kept the state volume: after 'server-up' again both nodes are still registered"
step server-down-v server-down-v
if "$REAL_DOCKER" volume inspect "$tag-server_state" >/dev/null 2>&1; then say "FAIL: 'down -v' left the state volume"; exit 1; fi
say "block 'server-down-v' removed the state volume"

# --- no Compose command tried to pull the image it builds --------------------------------------
if grep -lE "Pulling|pull access denied|repository does not exist" "$LOGS"/*.log >"$WORK/pulled.txt"; then
  say "FAIL: Compose tried to pull $FEDMUD_IMAGE (see $(tr '\n' ' ' <"$WORK/pulled.txt"))"; exit 1
fi
say "no Compose command tried to pull the locally built image"
say "PASS: the docs' commands, run over TLS with 2 registered SuperNodes in their own Compose projects; rogue refused; preflight messages"
