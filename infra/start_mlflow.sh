#!/usr/bin/env bash
# MLflow tracking server for a mim-scaling cluster (runs on the Ray head).
#
#   start_mlflow.sh [start]   start in the background (idempotent), wait for /health
#   start_mlflow.sh stop      stop the server started by `start`
#   start_mlflow.sh status    exit 0 if the server answers /health
#   start_mlflow.sh run       run in the foreground (containers: KubeRay sidecar)
#   start_mlflow.sh backup    copy the sqlite database to MLFLOW_DB_BACKUP_URI
#
# Settings (environment variables; none of them is a secret):
#   MLFLOW_HOST                   bind address            (default 127.0.0.1: reach it
#                                 through `ssh -L 5000:127.0.0.1:5000` / port-forward)
#   MLFLOW_PORT                   port                    (default 5000)
#   MLFLOW_HOME                   state directory         (default ~/mlflow)
#   MLFLOW_BACKEND_URI            backend store           (default sqlite:///$MLFLOW_HOME/mlflow.db)
#                                 e.g. postgresql://mlflow@db.internal:5432/mlflow. Do not put a
#                                 password in it: libpq reads it from ~/.pgpass (chmod 600).
#                                 The URI is handed to MLflow through the environment, never argv,
#                                 and is redacted in the log.
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts go, e.g. s3://bucket/_infra/mlflow-artifacts
#                                 (default $MLFLOW_HOME/artifacts). S3 access comes from the
#                                 instance profile / IRSA; clients never need S3 credentials.
#   MLFLOW_DB_BACKUP_URI          s3://... or a local path: `backup` copies the sqlite DB there
#                                 and `start`/`run` restore it when the local DB is missing.
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_START_TIMEOUT          seconds to wait for /health (default 120)
#   MLFLOW_PID_FILE, MLFLOW_LOG_FILE   (default $MLFLOW_HOME/mlflow.pid, mlflow.log)
#   MLFLOW_BIN                    mlflow executable (default: mlflow on PATH)
set -euo pipefail

cmd="${1:-start}"

MLFLOW_HOME="${MLFLOW_HOME:-$HOME/mlflow}"
case "$MLFLOW_HOME" in /*) ;; *) MLFLOW_HOME="$PWD/$MLFLOW_HOME" ;; esac
MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-2}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
MLFLOW_DB_PATH="$MLFLOW_HOME/mlflow.db"
DEFAULT_BACKEND="sqlite:///$MLFLOW_DB_PATH"
BACKEND_URI="${MLFLOW_BACKEND_URI:-$DEFAULT_BACKEND}"
ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_HOME/artifacts}"
BACKUP_URI="${MLFLOW_DB_BACKUP_URI:-}"
PID_FILE="${MLFLOW_PID_FILE:-$MLFLOW_HOME/mlflow.pid}"
LOG_FILE="${MLFLOW_LOG_FILE:-$MLFLOW_HOME/mlflow.log}"
START_TIMEOUT="${MLFLOW_START_TIMEOUT:-120}"

# Address used for local health checks (a wildcard bind is checked on loopback).
case "$MLFLOW_HOST" in 0.0.0.0 | "::" | "[::]") CHECK_HOST=127.0.0.1 ;; *) CHECK_HOST="$MLFLOW_HOST" ;; esac
HEALTH_URL="http://$CHECK_HOST:$MLFLOW_PORT/health"

log() { echo "[start_mlflow $(date -u +%FT%TZ)] $*"; }
redact() { sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#'; }
python_bin() { command -v python3 || command -v python; }

healthy() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -m 3 "$HEALTH_URL" >/dev/null 2>&1
  else
    "$(python_bin)" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$HEALTH_URL" >/dev/null 2>&1
  fi
}

port_in_use() { (exec 3<>"/dev/tcp/$CHECK_HOST/$MLFLOW_PORT") 2>/dev/null; }

# The pid in PID_FILE is alive and is an mlflow process (guards against pid reuse).
running_pid() {
  [[ -s "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q mlflow; then
    return 1
  fi
  echo "$pid"
}

using_default_sqlite() { [[ "$BACKEND_URI" == "$DEFAULT_BACKEND" ]]; }

restore_db() {
  using_default_sqlite || return 0
  [[ -n "$BACKUP_URI" && ! -e "$MLFLOW_DB_PATH" ]] || return 0
  if [[ "$BACKUP_URI" == s3://* ]]; then
    if aws s3 cp --only-show-errors "$BACKUP_URI" "$MLFLOW_DB_PATH.restore" 2>/dev/null; then
      mv "$MLFLOW_DB_PATH.restore" "$MLFLOW_DB_PATH"
      log "restored tracking database from $BACKUP_URI"
    else
      rm -f "$MLFLOW_DB_PATH.restore"
      log "no database backup at $BACKUP_URI yet; starting with an empty one"
    fi
  elif [[ -f "$BACKUP_URI" ]]; then
    cp "$BACKUP_URI" "$MLFLOW_DB_PATH"
    log "restored tracking database from $BACKUP_URI"
  fi
}

backup_db() {
  using_default_sqlite || { log "backend is not the default sqlite file: back it up with its own tools"; return 0; }
  [[ -n "$BACKUP_URI" ]] || { echo "MLFLOW_DB_BACKUP_URI is not set" >&2; return 1; }
  [[ -f "$MLFLOW_DB_PATH" ]] || { log "no database at $MLFLOW_DB_PATH yet"; return 0; }
  local tmp="$MLFLOW_HOME/mlflow.db.backup"
  # Online, consistent copy (safe while the server writes).
  "$(python_bin)" - "$MLFLOW_DB_PATH" "$tmp" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
with dst:
    src.backup(dst)
src.close(); dst.close()
PY
  if [[ "$BACKUP_URI" == s3://* ]]; then
    aws s3 cp --only-show-errors "$tmp" "$BACKUP_URI"
  else
    mkdir -p "$(dirname "$BACKUP_URI")"
    cp "$tmp" "$BACKUP_URI"
  fi
  rm -f "$tmp"
  log "backed up $MLFLOW_DB_PATH to $BACKUP_URI"
}

prepare() {
  mkdir -p "$MLFLOW_HOME"
  chmod 700 "$MLFLOW_HOME" 2>/dev/null || true   # not ours on a mounted volume: fine
  case "$ARTIFACTS_DESTINATION" in
    *://*) ;;
    *) mkdir -p "$ARTIFACTS_DESTINATION" ;;
  esac
  restore_db
}

server_args() {
  printf '%s\0' server --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" \
    --workers "$MLFLOW_WORKERS" --serve-artifacts \
    --artifacts-destination "$ARTIFACTS_DESTINATION"
}

start() {
  local pid waited=0
  if pid="$(running_pid)"; then
    if healthy; then
      log "already running (pid $pid) at http://$MLFLOW_HOST:$MLFLOW_PORT"
      return 0
    fi
    log "pid $pid exists but is not healthy yet; waiting"
  else
    rm -f "$PID_FILE"
    if healthy; then
      log "an MLflow server not started by this script already answers $HEALTH_URL; leaving it alone"
      return 0
    fi
    if port_in_use; then
      echo "port $MLFLOW_PORT on $CHECK_HOST is taken by something that is not MLflow" >&2
      return 1
    fi
    prepare
    log "starting mlflow on $MLFLOW_HOST:$MLFLOW_PORT backend=$(echo "$BACKEND_URI" | redact) artifacts=$ARTIFACTS_DESTINATION" | tee -a "$LOG_FILE"
    local -a args
    mapfile -d '' args < <(server_args)
    local launcher=()
    command -v setsid >/dev/null 2>&1 && launcher=(setsid)
    # The child writes its own pid, then execs mlflow: the pid file names the
    # server (a process-group leader), whatever setsid does.
    MLFLOW_BACKEND_STORE_URI="$BACKEND_URI" nohup "${launcher[@]}" bash -c \
      'echo $$ > "$0"; exec "$@"' "$PID_FILE" "$MLFLOW_BIN" "${args[@]}" \
      >>"$LOG_FILE" 2>&1 </dev/null &
    disown 2>/dev/null || true
  fi
  while (( waited < START_TIMEOUT )); do
    if healthy; then
      log "running (pid $(cat "$PID_FILE" 2>/dev/null)) at http://$MLFLOW_HOST:$MLFLOW_PORT; log: $LOG_FILE"
      return 0
    fi
    if (( waited > 2 )) && ! running_pid >/dev/null; then
      echo "mlflow exited during start-up; last lines of $LOG_FILE:" >&2
      tail -n 30 "$LOG_FILE" | redact >&2
      rm -f "$PID_FILE"
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "mlflow did not answer $HEALTH_URL within ${START_TIMEOUT}s (log: $LOG_FILE)" >&2
  return 1
}

stop() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  # Signal the process group (the server and its workers) when it leads one.
  local target="$pid"
  [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]] && target="-$pid"
  kill -TERM -- "$target" 2>/dev/null || true
  for i in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "$target" 2>/dev/null || true
  fi
  rm -f "$PID_FILE"
  log "stopped (pid $pid)"
}

run_foreground() {
  prepare
  log "running mlflow in the foreground on $MLFLOW_HOST:$MLFLOW_PORT backend=$(echo "$BACKEND_URI" | redact) artifacts=$ARTIFACTS_DESTINATION"
  local -a args
  mapfile -d '' args < <(server_args)
  MLFLOW_BACKEND_STORE_URI="$BACKEND_URI" exec "$MLFLOW_BIN" "${args[@]}"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status)
    if healthy; then log "healthy at $HEALTH_URL"; else log "not answering $HEALTH_URL"; exit 3; fi ;;
  run) run_foreground ;;
  backup) backup_db ;;
  *) echo "usage: $0 [start|stop|status|run|backup]" >&2; exit 2 ;;
esac
