#!/usr/bin/env bash
# A local Ray head on this machine, jobs submitted to it exactly as to a real cluster.
#
#   bash cluster/local.sh start      # a head (dashboard on 127.0.0.1:8265) in the background, PID recorded
#   bash cluster/local.sh submit jobs/generate.py --config configs/generate_demo.yaml --prompts p.txt --out out
#   bash cluster/local.sh stop       # stops that head by its own PID (never `ray stop`: it would kill
#                                    # every Ray process on a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$PWD/.venv}
STATE=${EDIFFI_RAY_STATE:-/tmp/ediffi-ray-head}
PORT=${EDIFFI_RAY_PORT:-6390}
DASH=${EDIFFI_DASHBOARD_PORT:-8265}
AGENT=${EDIFFI_AGENT_PORT:-52365}  # the job agent's HTTP port: another Ray instance on this host may hold the default
# Ray's other ports; unset leaves Ray's defaults (the client server on 10001, workers on 10002-19999, the rest
# free ports Ray picks). Another Ray instance on this host may hold those: set them to run beside it.
extra=()
port_flag() { if [ -n "${!1:-}" ]; then extra+=("$2" "${!1}"); fi; }
port_flag EDIFFI_CLIENT_PORT --ray-client-server-port
port_flag EDIFFI_NODE_MANAGER_PORT --node-manager-port
port_flag EDIFFI_OBJECT_MANAGER_PORT --object-manager-port
port_flag EDIFFI_AGENT_GRPC_PORT --dashboard-agent-grpc-port
port_flag EDIFFI_RUNTIME_ENV_AGENT_PORT --runtime-env-agent-port
port_flag EDIFFI_METRICS_PORT --metrics-export-port
port_flag EDIFFI_MIN_WORKER_PORT --min-worker-port  # with EDIFFI_MAX_WORKER_PORT: the workers' range
port_flag EDIFFI_MAX_WORKER_PORT --max-worker-port
export PATH="$VENV/bin:$PATH"  # the head resolves the jobs' `python` from its own PATH

stop_head() {  # the head recorded in $STATE/head.pid, by that PID only
  if [ -f "$STATE/head.pid" ]; then
    pid=$(cat "$STATE/head.pid")
    kill "$pid" 2> /dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
    rm -f "$STATE/head.pid"
    echo "head $pid stopped"
  fi
}

start_failed() {  # why, then the end of the head's log (it names the port when one was taken)
  echo "$1; the end of $STATE/head.log:" >&2
  tail -n 40 "$STATE/head.log" >&2
  exit 1
}

case "${1:-}" in
  start)
    mkdir -p "$STATE"
    nohup ray start --head --block --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
      --dashboard-agent-listen-port "$AGENT" "${extra[@]}" --temp-dir "$STATE/tmp" \
      --num-cpus "${EDIFFI_NUM_CPUS:-2}" --disable-usage-stats > "$STATE/head.log" 2>&1 &
    pid=$!
    echo "$pid" > "$STATE/head.pid"
    deadline=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$deadline" ]; do  # wait for the job API
      # (bounded: a stranger holding the dashboard port may accept the connection and never answer)
      if RAY_AUTH_MODE=token timeout 20 ray job list --address "http://127.0.0.1:$DASH" > /dev/null 2>&1; then
        echo "head up (pid $pid): RAY_ADDRESS=http://127.0.0.1:$DASH"
        exit 0
      fi
      if ! kill -0 "$pid" 2> /dev/null; then  # e.g. the GCS port was taken
        rm -f "$STATE/head.pid"
        start_failed "head exited before its job API came up"
      fi
      if grep -q "Failed to bind to 127.0.0.1:$DASH because it's already occupied" "$STATE/head.log"; then
        stop_head > /dev/null  # Ray runs on without a dashboard, so without the job API
        start_failed "the dashboard port $DASH is already in use"
      fi
      sleep 1
    done
    start_failed "head did not come up in 120 s (still running, pid $pid)"
    ;;
  submit)
    shift
    # A fresh head answers the job API a little before its job agent is ready ("No available
    # agent"): nothing was submitted then, so try again.
    for _ in $(seq 30); do
      log=$(mktemp)
      if RAY_AUTH_MODE=token ray job submit --address "http://127.0.0.1:$DASH" \
        --runtime-env cluster/runtime_env.yaml --working-dir . -- python "$@" 2>&1 | tee "$log"; then
        rm -f "$log"
        exit 0
      fi
      if grep -q "No available agent" "$log"; then
        rm -f "$log"
        sleep 2
        continue
      fi
      rm -f "$log"
      exit 1
    done
    exit 1
    ;;
  stop)
    stop_head
    ;;
  *)
    echo "usage: $0 start | submit JOB.py [args...] | stop" >&2
    exit 2
    ;;
esac
