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
export PATH="$VENV/bin:$PATH"  # the head resolves the jobs' `python` from its own PATH
case "${1:-}" in
  start)
    mkdir -p "$STATE"
    nohup ray start --head --block --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
      --dashboard-agent-listen-port "$AGENT" --temp-dir "$STATE/tmp" --num-cpus "${EDIFFI_NUM_CPUS:-2}" --disable-usage-stats \
      > "$STATE/head.log" 2>&1 &
    echo $! > "$STATE/head.pid"
    for _ in $(seq 120); do  # wait for the job API
      if RAY_AUTH_MODE=token ray job list --address "http://127.0.0.1:$DASH" > /dev/null 2>&1; then
        echo "head up (pid $(cat "$STATE/head.pid")): RAY_ADDRESS=http://127.0.0.1:$DASH"
        exit 0
      fi
      sleep 1
    done
    echo "head did not come up; see $STATE/head.log" >&2
    exit 1
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
    if [ -f "$STATE/head.pid" ]; then
      pid=$(cat "$STATE/head.pid")
      kill "$pid" 2> /dev/null || true
      for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
      rm -f "$STATE/head.pid"
      echo "head $pid stopped"
    fi
    ;;
  *)
    echo "usage: $0 start | submit JOB.py [args...] | stop" >&2
    exit 2
    ;;
esac
