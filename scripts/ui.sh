#!/usr/bin/env bash
# The local Dagster UI (`dg dev`: webserver, daemon, code server) that stops whole on Ctrl-C, SIGTERM or SIGHUP.
#   bash scripts/ui.sh [dg dev options, e.g. --port 3001]        (DPO_UI_STOP_SECONDS: grace before SIGKILL, default 30)
#
# Why a wrapper (measured, README "Operations"): `dg dev` / `dagster dev` map SIGTERM onto SIGINT's handler.
# Started from a script or in the background, SIGINT is ignored (a non-interactive shell does that for `cmd &`),
# so SIGTERM is ignored too and nothing stops. Here dg dev starts with SIGINT at its default, in its own
# process group; a signal to this script becomes one SIGINT to that whole group (what Ctrl-C in a terminal
# does), and whatever is still alive after the grace period is killed.
set -uo pipefail
cd "$(dirname "$0")/.."
export DPO_HOME=${DPO_HOME:-$PWD/.dpo_home}
export DAGSTER_HOME=${DAGSTER_HOME:-$DPO_HOME/dagster}
grace=${DPO_UI_STOP_SECONDS:-30}
.venv/bin/python -m resources.home init || exit  # the Dagster + MLflow stores, once, under a lock

.venv/bin/python -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)  # un-ignore: dagster maps SIGTERM to this handler
os.setpgid(0, 0)  # own process group: pgid = this pid
os.execvp(sys.argv[1], sys.argv[1:])' .venv/bin/dg dev "$@" &
pid=$!

alive() { ps -e -o pgid=,stat= | awk -v g="$pid" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'; }

stop() {
  trap '' INT TERM HUP
  echo "[ui] stopping Dagster: SIGINT to process group $pid" >&2
  kill -INT -- -"$pid" 2>/dev/null
  for ((i = 0; i < grace; i++)); do
    alive || break
    sleep 1
  done
  if alive; then
    echo "[ui] still running after ${grace}s, SIGKILL to:" >&2
    ps -e -o pgid=,pid=,args= | awk -v g="$pid" '$1 == g' >&2
    kill -KILL -- -"$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  exit 0
}
trap stop INT TERM HUP

wait "$pid"
rc=$?
kill -KILL -- -"$pid" 2>/dev/null  # dg dev ended by itself: no code server outlives it
exit "$rc"
