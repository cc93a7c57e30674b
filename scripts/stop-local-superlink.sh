#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run .` started for you, by its process id, and no other.
#
# Flower 1.39 writes no pid file for it; `flwr` finds it by its port, 127.0.0.1:39091 or
# FLWR_LOCAL_SUPERLINK_HTTP_API_PORT. This takes the process listening there, checks that it is a
# flower-superlink of this user, and stops that process id (SIGTERM, then SIGKILL after 15 s).
# Nothing listening there: it says so and exits 0. Someone else's process there: it exits 1.
set -euo pipefail

port=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}
say() { echo "[stop-local-superlink] $*" >&2; }
# a process that has ended stays in /proc as a zombie until its parent reaps it
alive() { [[ -e /proc/$1/stat ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) != Z ]]; }

listening=$(ss -Hltnp "sport = :$port" 2>/dev/null || true)
mapfile -t pids < <(grep -o 'pid=[0-9]*' <<<"$listening" | cut -d= -f2 | sort -u)
if ((${#pids[@]} == 0)); then
  if [[ -n $listening ]]; then say "port $port is taken by a process of another user; not stopping it"; exit 1; fi
  say "no local SuperLink listens on port $port"
  exit 0
fi
for pid in "${pids[@]}"; do
  owner=$(stat -c %u "/proc/$pid")
  command=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  if [[ $owner != "$(id -u)" || $command != *flower-superlink* ]]; then
    say "port $port is held by process $pid ($command), not a SuperLink of yours; not stopping it"
    exit 1
  fi
done
for pid in "${pids[@]}"; do
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  say "stopped the local SuperLink on port $port (pid $pid)"
done
