# Shared by scripts/compose-smoke.sh, scripts/netns-smoke.sh and deploy/multihost-compose-smoke.sh
# (sourced, not run). Rules that keep the checks deterministic:
#   - no `grep -q` (or `head`, `grep -m`) reading from a pipe: under `set -o pipefail` the writer can
#     die of SIGPIPE and fail the pipeline at random. Logs go to files first; `has` greps a file;
#   - every wait is a bounded loop (`wait_for`), never a fixed sleep;
#   - the docs' command blocks are run as written (`doc`), in a scratch copy of the project.

SMOKE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# has FILE ERE: the file exists and has a line matching ERE.
has() { [[ -f $1 ]] && grep -Eq -- "$2" "$1"; }
# count FILE ERE: how many lines of FILE match (0 when none or no file).
count() { if [[ -f $1 ]]; then grep -Ec -- "$2" "$1" || true; else echo 0; fi; }
# first FILE ERE: the first matching line, colour codes removed ("" when none).
first() { [[ -f $1 ]] || return 0; sed 's/\x1b\[[0-9;]*m//g' "$1" >"$1.plain"; grep -E -m1 -- "$2" "$1.plain" || true; }

# newest_run DIR: the directory of the newest DIR/*/summary.json, "" when there is none.
newest_run() {
  local summary newest=""
  for summary in "$1"/*/summary.json; do
    [[ -e $summary && ( -z $newest || $summary -nt $newest ) ]] && newest=$summary
  done
  [[ -z $newest ]] || dirname "$newest"
}

# check_run RUN_DIR ROUNDS LOG TAG: `deploy/fedmud_deploy.py check` on a finished run, its output
# shown with a [TAG] prefix (and kept in LOG); exits the script when the check fails.
check_run() {
  local status=0
  python3 deploy/fedmud_deploy.py check "$1" "$2" >"$3" 2>&1 || status=$?
  sed "s/^/[$4] /" "$3"
  [[ $status == 0 ]] || exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND every second until it succeeds.
wait_for() {
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  while ((SECONDS - start < limit)); do
    "$@" && return 0
    sleep 1
  done
  "$@" && return 0
  say "FAIL: $what within ${limit}s"
  return 1
}

# copy_tree DEST: the project's files (tracked and untracked, not ignored; no .git, .venv, results,
# credentials) copied to DEST, so that the docs' commands can run there as written.
copy_tree() {
  local dest=$1 list
  mkdir -p "$dest"
  list=$(mktemp)
  if git -C "$SMOKE_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$SMOKE_ROOT" ls-files -co --exclude-standard >"$list.all"
    local f
    while IFS= read -r f; do
      [[ -e $SMOKE_ROOT/$f && $f != deploy/certs/* && $f != results/* ]] && printf '%s\0' "$f"
    done <"$list.all" >"$list"
    tar -C "$SMOKE_ROOT" --null -T "$list" -cf "$list.tar"
  else
    tar -C "$SMOKE_ROOT" --exclude=.git --exclude=.venv --exclude=results --exclude=deploy/certs \
      --exclude=runs -cf "$list.tar" .
  fi
  tar -C "$dest" -xf "$list.tar"
  rm -f "$list" "$list.all" "$list.tar"
}

# doc NAME [--sub OLD NEW]...: the docs/deployment.md block NAME, shown and run by bash (-euo
# pipefail) in the current directory; its status is the block's.
doc() {
  local block
  block=$(python3 "$SMOKE_ROOT/deploy/doc_commands.py" --docs "$SMOKE_ROOT/docs/deployment.md" "$@") || return 1
  printf '%s\n' "$block" | sed 's/^/      $ /' >&2
  bash -euo pipefail -c "$block"
}

# doc_text NAME [--sub OLD NEW]...: the block's text only (for a block that is a file, not commands).
doc_text() { python3 "$SMOKE_ROOT/deploy/doc_commands.py" --docs "$SMOKE_ROOT/docs/deployment.md" "$@"; }
