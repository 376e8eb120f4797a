#!/usr/bin/env bash
# `make demo`: Kiri end to end on the local control plane (see docs/quickstart.md).
#
#  1. the control plane with 2 cloud GPU nodes and 12 edge nodes in 3 sites (hack/cluster; kwok nodes)
#  2. the operator, as a local process watching the demo namespace
#  3. a small classifier trained here (torch, seeded) and a ModelDeployment for it
#  4. the operator's compression Job, run here: verified ONNX export, int8 and fp16 variants, fidelity gates
#  5. the first rollout (every node at once: nothing runs yet), then v1.1 in waves, site by site, with the
#     variant each node runs
#  6. v2 with a canary that never becomes Ready: the gate fails and Kiri rolls back on its own
#  7. `kiri serve` of the int8 variant as the "edge" and of the full model as the "cloud": OIP v2 requests,
#     answered at the edge or, when the edge is not confident, by the cloud
#  8. a summary table
#
# Simulated nodes run no containers, so the compression Job's work runs here, as the same `kiri compress`
# command with the arguments the operator put in the Job, and its manifest is published the way the Job's
# second container does. Everything printed comes from real runs. Any failed step stops the demo with a
# non-zero exit; the processes it started are stopped on exit. The control plane is left running for the
# next run (`hack/cluster down` stops it).
#
# Environment: DEMO_DIR (default .kiri/demo), DEMO_NAMESPACE (kiri-demo), DEMO_CLOUD_NODES (2),
# DEMO_EDGE_NODES (12), DEMO_SITES (3), KIRI_STATE_DIR (the control plane's state, default .kiri).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
KIRI="$ROOT/.venv/bin/kiri"
export DEMO_DIR="${DEMO_DIR:-$ROOT/.kiri/demo}"
NS="${DEMO_NAMESPACE:-kiri-demo}"
MD=sensor
LOGS="$DEMO_DIR/logs"

STARTED=$SECONDS
STEP="start"
PIDS=()

bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step() {
  STEP="$1"
  echo
  bold "==> [$((SECONDS - STARTED))s] $1"
}
die() {
  echo "demo: $*" >&2
  exit 1
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if ((rc != 0)); then
    echo >&2
    echo "demo FAILED at step: $STEP (exit $rc). Logs: $LOGS" >&2
    for log in "$LOGS"/*.log; do
      [[ -s "$log" ]] || continue
      echo "---- last lines of $log" >&2
      tail -n 15 "$log" >&2
    done
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_http URL SECONDS PID: poll until URL answers 200, failing early if PID died.
wait_http() {
  local url="$1" timeout="$2" pid="$3" deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "process $pid exited before $url answered"
    ((SECONDS < deadline)) || die "$url did not answer within ${timeout}s"
    sleep 0.5
  done
}

demo() { "$PY" hack/demo.py "$@"; }

rm -rf "$DEMO_DIR"
mkdir -p "$LOGS"

# ------------------------------------------------------------------------------------------------------
step "Local control plane: ${DEMO_CLOUD_NODES:-2} cloud GPU nodes, ${DEMO_EDGE_NODES:-12} edge nodes in ${DEMO_SITES:-3} sites"
bash hack/cluster up --cloud-nodes "${DEMO_CLOUD_NODES:-2}" --edge-nodes "${DEMO_EDGE_NODES:-12}" \
  --sites "${DEMO_SITES:-3}" 2>&1 | tee "$LOGS/cluster.log"
eval "$(bash hack/cluster env)"
kubectl version 2>/dev/null | sed 's/^/  /'
demo fleet

kubectl apply --server-side --force-conflicts -f crds/modeldeployment.yaml >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl delete modeldeployment --all -n "$NS" --wait=true --timeout=60s >/dev/null
echo "  CRD modeldeployments.kiri.dev applied; namespace $NS ready"

# ------------------------------------------------------------------------------------------------------
step "Operator: kiri operator, standalone, watching namespace $NS"
HEALTH_PORT="$(free_port)"
METRICS_PORT="$(free_port)"
# The demo's file:// artifact store is a host directory the admin (this script) allows.
"$KIRI" operator --standalone --namespace "$NS" --liveness "http://127.0.0.1:$HEALTH_PORT/healthz" \
  --metrics-port "$METRICS_PORT" --resync-seconds 10 --host-store-root "$DEMO_DIR" >"$LOGS/operator.log" 2>&1 &
PIDS+=($!)
OPERATOR_PID=${PIDS[-1]}
wait_http "http://127.0.0.1:$HEALTH_PORT/healthz" 120 "$OPERATOR_PID"
echo "  operator up (pid $OPERATOR_PID); liveness :$HEALTH_PORT/healthz, metrics :$METRICS_PORT/metrics"

# model_deployment VERSION DIR THRESHOLD [EXTRA_EDGE_YAML]: the demo's ModelDeployment.
model_deployment() {
  local version="$1" dir="$2" threshold="$3" extra="${4:-}"
  local sha
  sha="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$dir/model.json")"
  cat <<YAML
apiVersion: kiri.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: $MD
  namespace: $NS
spec:
  model:
    name: sensor
    version: "$version"
    source:
      uri: file://$dir/model.pt2
      format: torch-export
      sha256: $sha
    evalDataUri: file://$dir/eval.npz
  cloud:
    replicas: 1
    resources: {cpu: "1", memory: 1Gi, gpu: 1}
  edge:
    artifacts:
      uri: file://$DEMO_DIR/store
    variants:
      - name: fp16
        method: fp16
        gate:
          - {metric: cosine, stat: min, op: ">=", threshold: 0.999}
        requires:
          matchLabels: {kiri.dev/accelerator: gpu}
      - name: int8
        method: int8-dynamic
        gate:
          - {metric: cosine, stat: mean, op: ">=", threshold: 0.995}
          - {metric: top1-agreement, op: ">=", threshold: 0.98}
    fallback:
      enabled: true
      confidenceThreshold: $threshold
$extra
  rollout:
    groupBy: topology.kubernetes.io/zone
    stages:
      - {nodes: 1, bakeSeconds: 2}
      - {percent: 50, bakeSeconds: 2}
      - {percent: 100}
    progressDeadlineSeconds: 15
YAML
}

# ------------------------------------------------------------------------------------------------------
step "Model v1: a small classifier trained here (torch, seed 1), applied as ModelDeployment $NS/$MD"
demo build-model --out "$DEMO_DIR/v1" --version 1.0.0 --seed 1
model_deployment 1.0.0 "$DEMO_DIR/v1" 0.8 >"$DEMO_DIR/v1/modeldeployment.yaml"
kubectl apply -f "$DEMO_DIR/v1/modeldeployment.yaml" | sed 's/^/  /'

# ------------------------------------------------------------------------------------------------------
step "Compression Job for v1: verified ONNX export, int8 and fp16 variants, fidelity gates"
demo run-job --namespace "$NS" --name "$MD" --label v1

# ------------------------------------------------------------------------------------------------------
step "First rollout of v1: nothing runs yet, so every node gets its variant at once (node:revision/variant)"
demo watch --namespace "$NS" --name "$MD" --label v1 --until Healthy --fail-on RolledBack,Failed --timeout 240

# ------------------------------------------------------------------------------------------------------
step "v1.1 (edge falls back to the cloud below confidence 0.9, was 0.8): waves, site by site"
echo "  stages per site: one canary node (bake 2s), then 50% (bake 2s), then 100%; ok = pod Ready"
# Train v2 meanwhile (it is needed in the next step; training is CPU-bound and the waves mostly wait).
demo build-model --out "$DEMO_DIR/v2" --version 2.0.0 --seed 2 --epochs 20 >"$LOGS/build-v2.log" 2>&1 &
PIDS+=($!)
BUILD_V2_PID=${PIDS[-1]}
model_deployment 1.0.0 "$DEMO_DIR/v1" 0.9 >"$DEMO_DIR/v1/modeldeployment-1.1.yaml"
kubectl apply -f "$DEMO_DIR/v1/modeldeployment-1.1.yaml" | sed 's/^/  /'
demo watch --namespace "$NS" --name "$MD" --label v1.1 --until Healthy --fail-on RolledBack,Failed --timeout 300
"$KIRI" get -n "$NS" | sed 's/^/  /'

# ------------------------------------------------------------------------------------------------------
step "v2, a retrained model whose canary never becomes Ready: Kiri rolls back to v1.1 on its own"
wait "$BUILD_V2_PID" || die "training v2 failed (see $LOGS/build-v2.log)"
cat "$LOGS/build-v2.log"
model_deployment 2.0.0 "$DEMO_DIR/v2" 0.9 "    podLabels: {kiri.dev/sim: never-ready}" >"$DEMO_DIR/v2/modeldeployment.yaml"
kubectl apply -f "$DEMO_DIR/v2/modeldeployment.yaml" | sed 's/^/  /'
demo run-job --namespace "$NS" --name "$MD" --label v2
demo watch --namespace "$NS" --name "$MD" --label v2 --until RolledBack --fail-on Healthy,Failed --timeout 240
echo "  kiri status $MD -n $NS:"
"$KIRI" status "$MD" -n "$NS" | sed 's/^/    /'
echo "  operator metrics behind the chart's KiriRolledBack alert and the dashboard:"
curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" |
  grep -E '^kiri_(modeldeployment_phase|rollbacks_total)\{' | grep -v ' 0.0$' | sed 's/^/    /'
echo "  events:"
kubectl get events -n "$NS" --field-selector involvedObject.kind=ModelDeployment --sort-by=.lastTimestamp \
  -o custom-columns=REASON:.reason,MESSAGE:.message --no-headers | tail -n 8 | cut -c1-150 | sed 's/^/    /'

# ------------------------------------------------------------------------------------------------------
step "Edge inference with cloud fallback: kiri serve (int8) -> kiri serve (full model), OIP v2"
# The v1 manifest the compression Job wrote (recorded by `demo run-job`).
V1_DIR="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["variants-v1"]["manifest"])' "$DEMO_DIR/summary.json")"
manifest_field() { "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" \
  "$V1_DIR/manifest.json" "$1"; }
FULL_URI="file://$V1_DIR/$(manifest_field "m['model']['uri']")"
FULL_SHA="$(manifest_field "m['model']['onnxSha256']")"
INT8_URI="file://$V1_DIR/$(manifest_field "next(v['uri'] for v in m['variants'] if v['name']=='int8')")"
INT8_SHA="$(manifest_field "next(v['sha256'] for v in m['variants'] if v['name']=='int8')")"
CLOUD_PORT="$(free_port)"
EDGE_PORT="$(free_port)"
"$KIRI" serve --name sensor --model-uri "$FULL_URI" --sha256 "$FULL_SHA" --variant full --model-version 1.0.0 \
  --host 127.0.0.1 --port "$CLOUD_PORT" --cache-dir "$DEMO_DIR/cache-cloud" >"$LOGS/serve-cloud.log" 2>&1 &
PIDS+=($!)
CLOUD_PID=${PIDS[-1]}
"$KIRI" serve --name sensor --model-uri "$INT8_URI" --sha256 "$INT8_SHA" --variant int8 --model-version 1.0.0 \
  --host 127.0.0.1 --port "$EDGE_PORT" --cache-dir "$DEMO_DIR/cache-edge" \
  --fallback-url "http://127.0.0.1:$CLOUD_PORT" --confidence-threshold 0.9 >"$LOGS/serve-edge.log" 2>&1 &
PIDS+=($!)
EDGE_PID=${PIDS[-1]}
wait_http "http://127.0.0.1:$CLOUD_PORT/v2/health/ready" 120 "$CLOUD_PID"
wait_http "http://127.0.0.1:$EDGE_PORT/v2/health/ready" 120 "$EDGE_PID"
echo "  cloud: full fp32 model on :$CLOUD_PORT   edge: int8 variant on :$EDGE_PORT (confidence threshold 0.9)"
demo infer --url "http://127.0.0.1:$EDGE_PORT" --model sensor --requests "$DEMO_DIR/v1/requests.npz"
echo "  edge runtime metrics:"
curl -fsS "http://127.0.0.1:$EDGE_PORT/metrics" | grep -E '^kiri_(responses|fallback)_total' | sed 's/^/    /'

# ------------------------------------------------------------------------------------------------------
step "Summary"
demo record elapsed "$((SECONDS - STARTED))"
demo summary
echo
echo "Demo done in $((SECONDS - STARTED))s. The control plane is still up: eval \"\$(hack/cluster env)\"; kubectl get mdep -n $NS"
