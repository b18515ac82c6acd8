#!/usr/bin/env bash
# A local Ray head on this machine, jobs submitted to it exactly as to a real cluster.
#
#   bash cluster/local.sh start      # starts a head (dashboard on 127.0.0.1:8265), records its PID
#   bash cluster/local.sh submit jobs/train_base.py --config configs/train_demo.yaml
#   bash cluster/local.sh stop       # stops the head this script started (never `ray stop`: other
#                                    # users' Ray instances on a shared machine stay untouched)
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
STATE=${EDIFFI_RAY_STATE:-/tmp/ediffi-ray-head}
PORT=${EDIFFI_RAY_PORT:-6390}
DASH=${EDIFFI_DASHBOARD_PORT:-8265}
case "${1:-}" in
  start)
    mkdir -p "$STATE"
    "$RAY" start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
      --temp-dir "$STATE/tmp" --num-cpus "${EDIFFI_NUM_CPUS:-2}" --disable-usage-stats
    pgrep -f "gcs_server.*--gcs_server_port=$PORT" > "$STATE/gcs.pid" || true
    echo "head up: RAY_ADDRESS=http://127.0.0.1:$DASH"
    ;;
  submit)
    shift
    RAY_ADDRESS="http://127.0.0.1:$DASH" "$RAY" job submit --runtime-env cluster/runtime_env.yaml \
      --working-dir . -- python "$@"
    ;;
  stop)
    # Stop only this head's processes: everything under its own temp dir / GCS port.
    pkill -f -- "--temp-dir=$STATE/tmp" || true
    pkill -f -- "$STATE/tmp" || true
    pkill -f "gcs_server.*--gcs_server_port=$PORT" || true
    echo "head on port $PORT stopped"
    ;;
  *)
    echo "usage: $0 start | submit JOB.py [args...] | stop" >&2
    exit 2
    ;;
esac
