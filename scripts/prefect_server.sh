#!/usr/bin/env bash
# Local Prefect server + the prefect.yaml deployments + a process worker (used by `make server` / `make server-stop`).
#
#   scripts/prefect_server.sh start   start the server on $HOST:$PORT (if not already healthy), create the
#                                     work pool if missing, `prefect deploy --all`, the failure alert
#                                     when ATTNRL_ALERT_WEBHOOK is set (attnrl alerts), start a worker
#   scripts/prefect_server.sh stop    stop the worker and the server started by `start`
#
# PIDs, logs and the server's API URL (api_url, read by the attnrl command) go to $STATE_DIR
# (default .prefect-server/). The server keeps its SQLite database in
# PREFECT_HOME (default ~/.prefect), so deployments and runs survive a restart.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PREFECT="$VENV/bin/prefect"
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-4200}
POOL=${POOL:-attnrl-process}
STATE_DIR=${STATE_DIR:-.prefect-server}
export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PWD  # prefect.yaml's pull step uses {{ $PWD }}: the project directory

healthy() { curl -fsS -o /dev/null --max-time 2 "$PREFECT_API_URL/health"; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # stop the process group started by `start` (TERM, then KILL after 15 s)
    local file=$1 name=$2 pid
    if alive "$file"; then
        pid=$(cat "$file")
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

start() {
    mkdir -p "$STATE_DIR"
    if healthy; then
        echo "Prefect server already running at http://$HOST:$PORT"
    else
        setsid "$PREFECT" server start --host "$HOST" --port "$PORT" >"$STATE_DIR/server.log" 2>&1 &
        echo $! >"$STATE_DIR/server.pid"
        for _ in $(seq 120); do healthy && break; alive "$STATE_DIR/server.pid" || break; sleep 0.5; done
        if ! healthy; then
            echo "Prefect server did not become healthy; see $STATE_DIR/server.log" >&2
            stop_pid "$STATE_DIR/server.pid" server
            exit 1
        fi
        echo "Prefect server running at http://$HOST:$PORT (log: $STATE_DIR/server.log)"
    fi
    "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process
    "$PREFECT" --no-prompt deploy --all
    # The failure alert (flows/alerts.py): a webhook POST when a deployment run fails or crashes.
    if [[ -n "${ATTNRL_ALERT_WEBHOOK:-}" ]]; then
        "$VENV/bin/attnrl" alerts --webhook "$ATTNRL_ALERT_WEBHOOK"
    fi
    if alive "$STATE_DIR/worker.pid"; then
        echo "worker already running (pid $(cat "$STATE_DIR/worker.pid"))"
    else
        setsid "$PREFECT" worker start --pool "$POOL" >"$STATE_DIR/worker.log" 2>&1 &
        echo $! >"$STATE_DIR/worker.pid"
        echo "worker polling $POOL (log: $STATE_DIR/worker.log)"
    fi
    # attnrl commands run in this directory (dvc repro's stages included) report to this server
    # when no PREFECT_API_URL is configured (flows/prefect_api.py).
    echo "$PREFECT_API_URL" >"$STATE_DIR/api_url"
    echo "UI: http://$HOST:$PORT    stop with: make server-stop"
}

stop() {
    stop_pid "$STATE_DIR/worker.pid" worker
    stop_pid "$STATE_DIR/server.pid" server
    rm -f "$STATE_DIR/api_url"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
