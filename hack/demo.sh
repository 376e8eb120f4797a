#!/usr/bin/env bash
# `make demo`: Kiri end to end on the local control plane (see docs/quickstart.md).
#
#  1. the control plane with 2 cloud GPU nodes and 12 edge nodes in 3 sites (hack/cluster; kwok nodes), and
#     two real nodes beside them (`hack/cluster up --real-nodes 2`: real kubelets and containerd): a real
#     edge node, alone in the edge site `lab` (the canary site: it sorts first), and a real cloud node. A
#     host that cannot run real nodes is named in one line and the demo goes on with kwok nodes only.
#  2. the operator, as a local process watching the demo namespace
#  3. a small classifier trained here (torch, seeded) and a ModelDeployment for it
#  4. the operator's compression Job, run here: verified ONNX export, int8 and fp16 variants, fidelity gates
#  5. the first rollout (every node at once: nothing runs yet), then v1.1 in waves, site by site, with the
#     variant each node runs
#  6. v2 with a canary that never becomes Ready: the gate fails and Kiri rolls back on its own
#  7. `kiri serve` of the int8 variant as the "edge" and of the full model as the "cloud": OIP v2 requests,
#     answered at the edge or, when the edge is not confident, by the cloud
#  8. the generative act: a tiny LLaMA-family chat model trained here (tests/lm_fixture.py, cached), its
#     ModelDeployment with `edge.collaboration` (cascade) compressed to a gated int4 variant and rolled out; the
#     operator's cloud tier serves the Job's fp32 pack (CPU, no GPU) behind the cloud Service and its edge pods
#     use that Service as their cloud tier; chat requests to the edge pod on the real edge node, answered by the
#     edge, a hard one continued by the cloud pod on the real cloud node, and the tokens by tier. Without real
#     nodes (kwok pods run no containers) the two pods' `kiri serve` run as host processes with the args the
#     operator rendered, and the demo says so.
#  9. a summary table
#
# With real nodes, the edge DaemonSets also land on the real edge node: its pod is a real container of the
# runtime image (hack/images.py) that fetches the variant from the store, caches it through the chart's node
# cache driver and turns Ready through its probes, and the demo sends it requests. v2's canary there fails
# for real: its variant is damaged in the store after the Job published it, so the runtime refuses it
# (sha256) and the pod never turns Ready.
#
# Simulated nodes run no containers, so the compression Job's work runs here, as the same `kiri compress`
# command with the arguments the operator put in the Job, and its manifest is published the way the Job's
# second container does. (The Jobs get no pod on any node, real or kwok: the standalone operator makes no
# compressor ServiceAccount, so the Job controller's pod creation is refused; the chat model's Job would run on
# the real cloud node, with its cloud tier, but the language-model compressor image needs torch, which these
# machines cannot install.) Everything printed comes from real runs. Any failed step stops the demo with a
# non-zero exit; the processes it started are stopped on exit. The control plane is left running for the
# next run (`hack/cluster down` stops it).
#
# Environment: DEMO_DIR (default .kiri/demo), DEMO_NAMESPACE (kiri-demo), DEMO_CLOUD_NODES (2),
# DEMO_EDGE_NODES (12), DEMO_SITES (3), DEMO_REAL_NODES (2; 0: kwok nodes only, the path for scale),
# DEMO_ACTS (all; generative: steps 1, 2, 8 and 9 only), DEMO_CASCADE_THRESHOLD (0.95),
# KIRI_STATE_DIR (the control plane's state, default .kiri).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
KIRI="$ROOT/.venv/bin/kiri"
export DEMO_DIR="${DEMO_DIR:-$ROOT/.kiri/demo}"
NS="${DEMO_NAMESPACE:-kiri-demo}"
MD=sensor
LM=chat
ACTS="${DEMO_ACTS:-all}"
[[ "$ACTS" == all || "$ACTS" == generative ]] || { echo "demo: DEMO_ACTS is all or generative, not $ACTS" >&2; exit 2; }
LM_THRESHOLD="${DEMO_CASCADE_THRESHOLD:-0.95}"  # cascade: the edge hands off above this uncertainty (1 - margin)
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
FLEET=(--cloud-nodes "${DEMO_CLOUD_NODES:-2}" --edge-nodes "${DEMO_EDGE_NODES:-12}" --sites "${DEMO_SITES:-3}")
WANT_REAL="${DEMO_REAL_NODES:-2}"
# Without real nodes wanted, the ones an earlier run joined go too (kwok only).
if ((WANT_REAL == 0)); then FLEET+=(--real-nodes 0); fi
bash hack/cluster up "${FLEET[@]}" 2>&1 | tee "$LOGS/cluster.log"
eval "$(bash hack/cluster env)"
kubectl version 2>/dev/null | sed 's/^/  /'

# real_nodes_up: the real-node tools, binaries and `hack/cluster up --real-nodes`; on failure REAL_WHY says why.
REAL=0
REAL_WHY=""
real_nodes_up() {
  local log="$LOGS/real-nodes.log"
  if ((EUID != 0)); then
    REAL_WHY="they need root (network namespaces, mounts, cgroups) and this is uid $EUID"
    return 1
  fi
  if ! bash hack/install-debs.sh --real-nodes >>"$log" 2>&1; then
    REAL_WHY="installing their Debian packages failed (see $log)"
    return 1
  fi
  echo "  real-node binaries (kubelet, kube-proxy, containerd, runc, CoreDNS; built once, ~15 min cold) ..."
  if ! bash hack/build-binaries.sh real-nodes >>"$log" 2>&1; then
    REAL_WHY="building kubelet/containerd/runc failed (see $log)"
    return 1
  fi
  if ! bash hack/cluster up "${FLEET[@]}" --real-nodes "$WANT_REAL" >>"$log" 2>&1; then
    REAL_WHY="$(grep -E 'error:' "$log" | tail -n 1 | sed -e 's/^hack\/cluster up: error: //' -e 's/^this host cannot run real nodes: //')"
    return 1
  fi
}
if ((WANT_REAL > 0)); then
  if real_nodes_up; then
    REAL=1
    { grep -E 'real node|real-node|host:' "$LOGS/real-nodes.log" || echo "[cluster] real nodes: already joined"; } |
      tail -n 6 | sed 's/^/  /'
  else
    echo "  real nodes: this host cannot run them (${REAL_WHY:-see $LOGS/real-nodes.log}); the demo goes on with kwok nodes only"
  fi
fi
if ((REAL)); then
  step "Real nodes: the runtime and node-cache images (built without Docker), the node cache driver"
  "$PY" hack/images.py load runtime cache-csi >"$LOGS/images.log" 2>&1 || die "hack/images.py load failed (see $LOGS/images.log)"
  tail -n 4 "$LOGS/images.log" | sed 's/^/  /'
  demo real-setup --work "$DEMO_DIR/real"
fi
demo fleet

kubectl apply --server-side --force-conflicts -f crds/modeldeployment.yaml >/dev/null
kubectl wait --for condition=established --timeout=60s crd/modeldeployments.kiri.dev >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl delete modeldeployment --all -n "$NS" --wait=true --timeout=60s >/dev/null
# Earlier demos made the chat's pods themselves (label part-of=kiri-demo): gone, they would hold the real nodes.
kubectl delete pods,services -n "$NS" -l app.kubernetes.io/part-of=kiri-demo --ignore-not-found --wait=true \
  --timeout=60s >/dev/null
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

# On real nodes: the edge pods tolerate their taint (so the DaemonSets land on the real edge node too), use the
# images hack/images.py imported (no registry), and a real pod gets longer to start than a kwok one.
if ((REAL)); then
  REAL_EDGE_YAML="    tolerations: [{key: kiri.dev/node-kind, operator: Equal, value: real, effect: NoSchedule}]"
  RUNTIME_YAML="  runtime: {imagePullPolicy: Never}"
  PROGRESS_DEADLINE=60
else
  REAL_EDGE_YAML=""
  RUNTIME_YAML=""
  PROGRESS_DEADLINE=15
fi

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
$REAL_EDGE_YAML
$RUNTIME_YAML
  rollout:
    groupBy: topology.kubernetes.io/zone
    stages:
      - {nodes: 1, bakeSeconds: 2}
      - {percent: 50, bakeSeconds: 2}
      - {percent: 100}
    progressDeadlineSeconds: $PROGRESS_DEADLINE
YAML
}

# The classifier's acts (steps 3-7); DEMO_ACTS=generative leaves them out.
classifier_acts() {
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
  if ((REAL)); then
    echo "  the real edge pod (site lab, the canary site) serves v1.1: confident OIP v2 requests sent to its pod IP"
    demo real-infer --namespace "$NS" --name "$MD" --model sensor --requests "$DEMO_DIR/v1/requests.npz"
  fi

  # ------------------------------------------------------------------------------------------------------
  step "v2, a retrained model whose canary never becomes Ready: Kiri rolls back to v1.1 on its own"
  wait "$BUILD_V2_PID" || die "training v2 failed (see $LOGS/build-v2.log)"
  cat "$LOGS/build-v2.log"
  model_deployment 2.0.0 "$DEMO_DIR/v2" 0.9 "    podLabels: {kiri.dev/sim: never-ready}" >"$DEMO_DIR/v2/modeldeployment.yaml"
  kubectl apply -f "$DEMO_DIR/v2/modeldeployment.yaml" | sed 's/^/  /'
  if ((REAL)); then
    # The canary site is the real node, where kwok's never-ready label means nothing: v2's int8 variant is damaged
    # in the store before its manifest is published, so the real runtime refuses it and never turns Ready.
    echo "  the canary is the real edge node: v2's int8 variant is damaged before publishing (a bad upload)"
    demo run-job --namespace "$NS" --name "$MD" --label v2 --damage int8
  else
    demo run-job --namespace "$NS" --name "$MD" --label v2
  fi
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
}
if [[ "$ACTS" == all ]]; then
  classifier_acts
else
  echo
  echo "  DEMO_ACTS=$ACTS: the classifier acts are left out"
fi

# ------------------------------------------------------------------------------------------------------
step "Generative act: a tiny LLaMA-family chat model trained here, as ModelDeployment $NS/$LM"
demo lm-build --out "$DEMO_DIR/lm"
LM_SHA="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$DEMO_DIR/lm/model.json")"
# The cloud tier serves the Job's fp32 onnxruntime-genai pack with `kiri serve`, which decodes on CPU: it asks no
# GPU. With real nodes it is placed on the real cloud node; the edge DaemonSet reaches the real edge node through
# its toleration.
if ((REAL)); then
  LM_CLOUD_PLACE="    nodeSelector: {kiri.dev/tier: cloud, kiri.dev/node-kind: real}
    tolerations: [{key: kiri.dev/node-kind, operator: Equal, value: real, effect: NoSchedule}]"
else
  LM_CLOUD_PLACE=""
fi
cat >"$DEMO_DIR/lm/modeldeployment.yaml" <<YAML
apiVersion: kiri.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: $LM
  namespace: $NS
spec:
  model:
    name: $LM
    version: "1.0.0"
    source:
      uri: file://$DEMO_DIR/lm/source.tar
      format: hf
      sha256: $LM_SHA
    evalDataUri: file://$DEMO_DIR/lm/eval.jsonl
  cloud:
    replicas: 1
    resources: {cpu: 500m, memory: 2Gi, gpu: 0}
    runtime: {threads: 1}
$LM_CLOUD_PLACE
  edge:
    artifacts:
      uri: file://$DEMO_DIR/store
    variants:
      - {name: int4, method: int4}
    collaboration:
      mode: cascade
      cascade: {threshold: $LM_THRESHOLD}
$REAL_EDGE_YAML
$RUNTIME_YAML
  rollout:
    groupBy: topology.kubernetes.io/zone
    stages:
      - {percent: 100}
    progressDeadlineSeconds: 60
YAML
kubectl apply -f "$DEMO_DIR/lm/modeldeployment.yaml" | sed 's/^/  /'
echo "  edge.collaboration: cascade, threshold $LM_THRESHOLD (the edge hands the rest of an answer to the cloud"
echo "  Service when its uncertainty passes it); the cloud waits for the Job's fp32 pack:"
CLOUD_READY=""
for _ in {1..40}; do  # the operator's first reconcile of it
  CLOUD_READY="$(kubectl get modeldeployment "$LM" -n "$NS" -o jsonpath='{range .status.conditions[?(@.type=="CloudReady")]}CloudReady {.status} {.reason}: {.message}{end}')"
  [[ -n "$CLOUD_READY" ]] && break
  sleep 0.5
done
echo "    ${CLOUD_READY:-CloudReady not reported yet}" | cut -c1-150
echo "  its compression Job: the fp32 onnxruntime-genai build checked against HF transformers, an int4 variant gated"
echo "  on KL and top-1 agreement over the eval texts"
demo run-job --namespace "$NS" --name "$LM" --label lm --timeout 300
demo watch --namespace "$NS" --name "$LM" --label lm --until Healthy --fail-on RolledBack,Failed --timeout 180

if ((REAL)); then
  # The operator's own pods: the edge DaemonSet's pod on the real edge node, its cloud tier the cloud Service,
  # whose endpoint is the cloud Deployment's pod on the real cloud node.
  LM_EDGE_URL="$(demo lm-tiers --namespace "$NS" --name "$LM")"
  LM_WHERE="the operator's pods: edge (int4) on kiri-real-0 -> Service $LM-cloud -> cloud (fp32 pack) on kiri-real-1"
else
  # kwok nodes run no containers: the operator's two pods run here, as host processes with the args the operator
  # rendered into them (only address, cache, threads, and the cloud's address instead of its Service name).
  echo "  no real nodes: the operator's edge and cloud pods are on kwok nodes, which run no containers, so their"
  echo "  kiri serve runs here as host processes, with the args the operator rendered into the DaemonSet and Deployment"
  LM_CLOUD_PORT="$(free_port)"
  LM_EDGE_PORT="$(free_port)"
  mapfile -t LM_CLOUD_ARGS < <(demo lm-host-args --namespace "$NS" --name "$LM" --tier cloud \
    --port "$LM_CLOUD_PORT" --cache-dir "$DEMO_DIR/cache-lm-cloud")
  mapfile -t LM_EDGE_ARGS < <(demo lm-host-args --namespace "$NS" --name "$LM" --tier edge \
    --port "$LM_EDGE_PORT" --cache-dir "$DEMO_DIR/cache-lm-edge" --cloud-url "http://127.0.0.1:$LM_CLOUD_PORT")
  ((${#LM_CLOUD_ARGS[@]} && ${#LM_EDGE_ARGS[@]})) || die "could not read the chat model's rendered kiri serve args"
  "$KIRI" "${LM_CLOUD_ARGS[@]}" >"$LOGS/serve-lm-cloud.log" 2>&1 &
  PIDS+=($!)
  LM_CLOUD_PID=${PIDS[-1]}
  "$KIRI" "${LM_EDGE_ARGS[@]}" >"$LOGS/serve-lm-edge.log" 2>&1 &
  PIDS+=($!)
  LM_EDGE_PID=${PIDS[-1]}
  wait_http "http://127.0.0.1:$LM_CLOUD_PORT/v2/health/ready" 120 "$LM_CLOUD_PID"
  wait_http "http://127.0.0.1:$LM_EDGE_PORT/v2/health/ready" 120 "$LM_EDGE_PID"
  LM_EDGE_URL="http://127.0.0.1:$LM_EDGE_PORT"
  LM_WHERE="host processes (no real nodes) with the operator's args: edge (int4) :$LM_EDGE_PORT -> cloud (fp32 pack) :$LM_CLOUD_PORT"
fi
demo chat --url "$LM_EDGE_URL" --model "$LM" --where "$LM_WHERE, threshold $LM_THRESHOLD"

# ------------------------------------------------------------------------------------------------------
step "Summary"
demo record elapsed "$((SECONDS - STARTED))"
demo summary
echo
echo "Demo done in $((SECONDS - STARTED))s. The control plane is still up: eval \"\$(hack/cluster env)\"; kubectl get mdep -n $NS"
