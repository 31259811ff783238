#!/usr/bin/env bash
#! End-to-end on a kind cluster: build both images from the Dockerfiles, load them, install the
#! chart with Helm, run Ollama with a small model, apply a TokenGoRelay and a TokenGoExit, wait for
#! Ready, send a chat completion from a `tokengo client` on the host through the relay, then
#! delete the resources and check that the garbage collector removed their children.
#
# Needs: docker, kind, kubectl, helm, cargo, curl, python3 and internet access (images, model).
# Runs in the upstream CI (.github/workflows/kind.yml); not on machines without a registry.
#
#   kind-tests/run.sh            KEEP_CLUSTER=1 keeps the cluster afterwards
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cluster="${KIND_CLUSTER:-tokengo-e2e}"
tag="e2e"
model="${OLLAMA_MODEL:-smollm2:135m}"
client_pid=""

step() { printf '\n==== [%s] %s ====\n' "$(date -u +%H:%M:%S)" "$*"; }
cleanup() {
    local rc=$?
    [[ -n "$client_pid" ]] && kill "$client_pid" 2>/dev/null || true
    if [[ $rc -ne 0 ]]; then
        echo "---- diagnostics"
        kubectl get tokengorelays,tokengoexits,deploy,pods,svc,secrets -A -o wide || true
        kubectl -n tokengo-system logs deploy/tokengo --tail=200 || true
        kubectl -n tokengo logs deploy/edge-relay --tail=100 || true
        kubectl -n tokengo logs deploy/ollama-exit --all-containers --tail=100 || true
        [[ -f /tmp/tokengo-client.log ]] && tail -50 /tmp/tokengo-client.log
    fi
    [[ "${KEEP_CLUSTER:-0}" == 1 ]] || kind delete cluster --name "$cluster" || true
    exit "$rc"
}
trap cleanup EXIT

step "kind cluster $cluster"
kind create cluster --name "$cluster" --config kind-tests/kind-config.yaml --wait 120s

step "images from Dockerfile.node and Dockerfile.operator"
docker build -f Dockerfile.node -t "tokengo/node:$tag" .
docker build -f Dockerfile.operator -t "tokengo/operator:$tag" .
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "tokengo/.*:$tag"
kind load docker-image --name "$cluster" "tokengo/node:$tag" "tokengo/operator:$tag"

step "host client binary"
cargo build --release --locked -p tokengo
tokengo="$(pwd)/target/release/tokengo"

step "helm install tokengo charts/tokengo"
helm install tokengo charts/tokengo --namespace tokengo-system --create-namespace \
    --set image.tag="$tag" --set nodeImage.tag="$tag" --set image.pullPolicy=Never \
    --wait --timeout 180s
kubectl -n tokengo-system rollout status deployment/tokengo --timeout=120s

step "Ollama with $model"
kubectl apply -f kind-tests/manifests/ollama.yaml
kubectl -n models rollout status deployment/ollama --timeout=300s
kubectl -n models exec deploy/ollama -- ollama pull "$model"

step "TokenGoRelay and TokenGoExit"
kubectl create namespace tokengo
kubectl apply -f kind-tests/manifests/tokengo.yaml
kubectl -n tokengo wait --for=condition=Ready tokengorelay/edge --timeout=300s
kubectl -n tokengo wait --for=condition=Ready tokengoexit/ollama --timeout=300s
kubectl -n tokengo get tokengorelays,tokengoexits -o wide

relay_addr="$(kubectl -n tokengo get tokengorelay edge -o jsonpath='{.status.addresses[1]}')"
peer="$(kubectl -n tokengo get tokengorelay edge -o jsonpath='{.status.peerId}')"
[[ "$relay_addr" == "/ip4/127.0.0.1/udp/30433/quic-v1/p2p/$peer" ]] || { echo "unexpected relay address $relay_addr"; exit 1; }
exit_peer="$(kubectl -n tokengo get tokengoexit ollama -o jsonpath='{.status.peerId}')"
echo "relay $relay_addr, exit $exit_peer"
# The exit has registered with the relay once its pod is Ready; its log says so.
kubectl -n tokengo logs deploy/ollama-exit -c exit | grep -q "registered with relay" \
    || { echo "the exit did not register with the relay"; exit 1; }

step "chat completion: host client -> relay (NodePort) -> exit -> Ollama"
"$tokengo" client --relay "$relay_addr" --listen 127.0.0.1:18080 >/tmp/tokengo-client.log 2>&1 &
client_pid=$!
for _ in $(seq 1 100); do
    grep -q "client listening on" /tmp/tokengo-client.log && break
    kill -0 "$client_pid" || { cat /tmp/tokengo-client.log; exit 1; }
    sleep 0.1
done
answer="$(curl -sS --fail-with-body --max-time 300 http://127.0.0.1:18080/v1/chat/completions \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}], \"max_tokens\": 16, \"temperature\": 0}")"
echo "$answer"
python3 - "$answer" <<'PY'
import json, sys
body = json.loads(sys.argv[1])
message = body["choices"][0]["message"]
assert message["role"] == "assistant" and message["content"].strip(), body
print("answer:", message["content"].strip()[:80])
PY

step "delete: the garbage collector removes every child"
kubectl -n tokengo delete tokengoexit ollama --wait=true
kubectl -n tokengo delete tokengorelay edge --wait=true
for child in deployment/ollama-exit secret/ollama-exit-keys deployment/edge-relay service/edge-relay secret/edge-relay-identity; do
    kubectl -n tokengo wait --for=delete "$child" --timeout=120s 2>/dev/null || {
        kubectl -n tokengo get "$child" >/dev/null 2>&1 && { echo "$child was not garbage-collected"; exit 1; }
    }
done
[[ -z "$(kubectl -n tokengo get deploy,svc,secret -l app.kubernetes.io/managed-by=tokengo-operator -o name)" ]] \
    || { echo "children left behind"; exit 1; }

step "helm uninstall"
helm uninstall tokengo --namespace tokengo-system --wait
echo "kind end-to-end: passed"
