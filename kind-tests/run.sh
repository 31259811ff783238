#!/usr/bin/env bash
#! End-to-end on a kind cluster: build both images from the Dockerfiles, load them, install the
#! chart with Helm, run Ollama with a small model, apply a TokenGoRelay (2 replicas) and a
#! TokenGoExit, wait for Ready, then from a `tokengo client` on the host: a chat completion, a
#! streamed one, an OHTTP key rotation under load (no request may fail, the exit pod is not
#! restarted), the relay scaled to 3 replicas and one of its pods deleted under load (at most the
#! requests in flight on it fail), and finally delete the resources and check their children are
#! gone and both identity Secrets kept.
#!
#! The manifests in kind-tests/manifests are shared with the one-node tier (tests/k8s_node):
#! tokengo.yaml applied unchanged by both, the model server as Service `model` in namespace
#! `models` (here Ollama, model-ollama.yaml).
#
# Needs: docker, kind, kubectl, helm, cargo, curl, python3 and internet access (images, model).
# Runs in the upstream CI (.github/workflows/kind.yml); not on machines without a registry.
#
#   kind-tests/run.sh            KEEP_CLUSTER=1 keeps the cluster afterwards
#   KIND_NODE_IMAGE=...          another node image (default: pinned below, for kind v0.30.0)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cluster="${KIND_CLUSTER:-tokengo-e2e}"
# kind v0.30.0's image for Kubernetes 1.34.0 (a node image is tied to the kind release).
node_image="${KIND_NODE_IMAGE:-kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a}"
tag="e2e"
node_repo="tokengo-e2e/tokengo-node"
operator_repo="tokengo-e2e/tokengo-operator"
model="${OLLAMA_MODEL:-smollm2:135m}"
work="$(mktemp -d)"
client_pid=""
load_pid=""

step() { printf '\n==== [%s] %s ====\n' "$(date -u +%H:%M:%S)" "$*"; }
cleanup() {
    local rc=$?
    [[ -n "$load_pid" ]] && { touch "$work/stop"; wait "$load_pid" 2>/dev/null || true; }
    [[ -n "$client_pid" ]] && { kill "$client_pid" 2>/dev/null || true; }
    if [[ $rc -ne 0 ]]; then
        echo "---- diagnostics"
        kubectl get tokengorelays,tokengoexits,deploy,sts,pods,svc,pdb,secrets -A -o wide || true
        kubectl -n tokengo-system logs deploy/tokengo --tail=200 || true
        kubectl -n tokengo logs -l app.kubernetes.io/component=relay --all-containers --prefix --tail=100 || true
        kubectl -n tokengo logs -l app.kubernetes.io/component=exit --all-containers --prefix --tail=100 || true
        [[ -f "$work/client.log" ]] && tail -100 "$work/client.log"
    fi
    rm -rf "$work"
    [[ "${KEEP_CLUSTER:-0}" == 1 ]] || kind delete cluster --name "$cluster" || true
    exit "$rc"
}
trap cleanup EXIT

# The workload (Deployment or StatefulSet) the operator made for a resource's component.
workload() { # component instance
    kubectl -n tokengo get deployment,statefulset \
        -l "app.kubernetes.io/component=$1,app.kubernetes.io/instance=$2" -o name | head -n 1
}

# Waits until the exit's tunnels are registered with every one of the relay's pods, WANT of them
# (its admin /status through the API server's pod proxy): the exit resolves the relay's headless
# Service name again every 10 s, so a new relay pod has no exit for a few seconds after it is
# Ready.
wait_exit_registered() { # want
    local ips status
    for _ in $(seq 1 120); do
        ips="$(kubectl -n tokengo get pods -l app.kubernetes.io/component=relay,app.kubernetes.io/instance=edge \
            -o jsonpath='{.items[*].status.podIP}')"
        status="$(kubectl get --raw "/api/v1/namespaces/tokengo/pods/llm-exit-0:9090/proxy/status" 2>/dev/null || true)"
        if python3 - "$1" "$ips" "$status" <<'PY'
import json, sys
want, pods = int(sys.argv[1]), set(sys.argv[2].split())
try:
    relays = json.loads(sys.argv[3])["exit"]["relays"]
except (ValueError, KeyError, TypeError):
    sys.exit(1)
registered = {r["resolved"].rsplit(":", 1)[0] for r in relays if r.get("registered") and r.get("resolved")}
sys.exit(0 if len(pods) == want and registered == pods else 1)
PY
        then
            echo "the exit is registered with all $1 relay pods: $ips"
            return 0
        fi
        sleep 1
    done
    echo "the exit is not registered with $1 relay pods ($ips): $status"
    exit 1
}

# Starts the load generator (2 workers) in the background; returns once requests succeed.
# Failures allowed: the second argument (default none).
start_load() { # name [max-failures]
    rm -f "$work/stop" "$work/$1.progress"
    python3 kind-tests/load.py load http://127.0.0.1:18080 "$model" --workers 2 --max-failures "${2:-0}" \
        --stop "$work/stop" --out "$work/$1.json" --progress "$work/$1.progress" &
    load_pid=$!
    for _ in $(seq 1 120); do
        [[ "$(cat "$work/$1.progress" 2>/dev/null || echo 0)" -ge 4 ]] && return 0
        kill -0 "$load_pid" || { echo "the load generator stopped"; exit 1; }
        sleep 1
    done
    echo "$1: no requests succeeded before the disruption"
    exit 1
}

# Stops it after a few more seconds; fails when more requests failed than allowed.
stop_load() { # name
    sleep 10
    touch "$work/stop"
    local rc=0
    wait "$load_pid" || rc=$?
    load_pid=""
    [[ $rc -eq 0 ]] || { echo "$1: requests failed under load (see above)"; exit 1; }
}

step "kind cluster $cluster ($node_image)"
kind create cluster --name "$cluster" --image "$node_image" --config kind-tests/kind-config.yaml --wait 120s

step "images from Dockerfile.node and Dockerfile.operator (default base: the official Rust image)"
docker build -f Dockerfile.node -t "$node_repo:$tag" .
docker build -f Dockerfile.operator -t "$operator_repo:$tag" .
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "tokengo-e2e/.*:$tag"
# `kind load docker-image` fails with Docker's containerd image store; an archive works with both.
docker save -o "$work/images.tar" "$node_repo:$tag" "$operator_repo:$tag"
kind load image-archive --name "$cluster" "$work/images.tar"
rm -f "$work/images.tar"

step "host client binary"
cargo build --release --locked -p tokengo
tokengo="$(pwd)/target/release/tokengo"

step "helm install tokengo charts/tokengo"
helm install tokengo charts/tokengo --namespace tokengo-system --create-namespace \
    --set image.repository="$operator_repo" --set image.tag="$tag" --set image.pullPolicy=Never \
    --set nodeImage.repository="$node_repo" --set nodeImage.tag="$tag" --set nodeImage.pullPolicy=Never \
    --set podDisruptionBudget.enabled=true \
    --wait --timeout 180s
kubectl -n tokengo-system rollout status deployment/tokengo --timeout=120s
# The operator applied its CRDs over Helm's (stamped with its version).
kubectl get crd tokengorelays.tokengo.io -o jsonpath='{.metadata.annotations.tokengo\.io/operator-version}' | grep -q . \
    || { echo "the operator did not apply its CRDs"; exit 1; }

step "Ollama (Service model.models) pulling $model"
kubectl apply -f kind-tests/manifests/model-ollama.yaml
kubectl -n models rollout status deployment/ollama --timeout=300s
kubectl -n models exec deploy/ollama -- ollama pull "$model"

step "TokenGoRelay (2 replicas) and TokenGoExit beside Ollama (manifests/tokengo.yaml)"
kubectl apply -f kind-tests/manifests/tokengo.yaml
kubectl -n tokengo wait --for=condition=Ready tokengorelay/edge --timeout=300s
kubectl -n tokengo wait --for=condition=Ready tokengoexit/llm --timeout=300s
kubectl -n tokengo get tokengorelays,tokengoexits -o wide
relay_workload="$(workload relay edge)"
exit_workload="$(workload exit llm)"
echo "relay: $relay_workload, exit: $exit_workload"
[[ "$(kubectl -n tokengo get "$relay_workload" -o jsonpath='{.status.readyReplicas}')" == 2 ]] \
    || { echo "the relay does not run 2 ready replicas"; exit 1; }

relay_addr="$(kubectl -n tokengo get tokengorelay edge -o jsonpath='{.status.addresses[1]}')"
peer="$(kubectl -n tokengo get tokengorelay edge -o jsonpath='{.status.peerId}')"
[[ "$relay_addr" == "/ip4/127.0.0.1/udp/30433/quic-v1/p2p/$peer" ]] || { echo "unexpected relay address $relay_addr"; exit 1; }
exit_peer="$(kubectl -n tokengo get tokengoexit llm -o jsonpath='{.status.peerId}')"
echo "relay $relay_addr, exit $exit_peer"
kubectl -n tokengo logs -l app.kubernetes.io/component=exit,app.kubernetes.io/instance=llm --all-containers --tail=-1 \
    | grep -q "registered with relay" || { echo "the exit did not register with the relay"; exit 1; }

step "chat completion: host client -> relay (NodePort) -> exit -> Ollama"
# Pinned to our exit (as the README advises), when the status names one PeerId.
pin=()
[[ -n "$exit_peer" ]] && pin=(--exit "$exit_peer")
"$tokengo" client --relay "$relay_addr" "${pin[@]}" --listen 127.0.0.1:18080 >"$work/client.log" 2>&1 &
client_pid=$!
for _ in $(seq 1 100); do
    grep -q "client listening on" "$work/client.log" && break
    kill -0 "$client_pid" || { cat "$work/client.log"; exit 1; }
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

step "streamed chat completion (incremental chunks, then [DONE])"
python3 kind-tests/load.py stream http://127.0.0.1:18080 "$model"

step "OHTTP key rotation under load (tokengo.io/rotate): no request may fail"
keys_before="$(kubectl -n tokengo get tokengoexit llm -o jsonpath='{.status.keys[0].keyId}')"
start_load rotation
kubectl -n tokengo annotate tokengoexit llm --overwrite "tokengo.io/rotate=$(date +%s)"
for _ in $(seq 1 120); do
    [[ "$(kubectl -n tokengo get tokengoexit llm -o jsonpath='{.status.keys[0].keyId}')" != "$keys_before" ]] && break
    sleep 1
done
[[ "$(kubectl -n tokengo get tokengoexit llm -o jsonpath='{.status.keys[0].keyId}')" != "$keys_before" ]] \
    || { echo "the key was not rotated"; exit 1; }
kubectl -n tokengo get tokengoexit llm -o jsonpath='{.status.keys}'; echo
# No pod rolls: the kubelet updates the mounted Secret (within its sync period, a minute by
# default) and the running exit reads its keyring again, serving the new key without a restart.
new_key="$(kubectl -n tokengo get tokengoexit llm -o jsonpath='{.status.keys[0].keyId}')"
exit_uid="$(kubectl -n tokengo get pod llm-exit-0 -o jsonpath='{.metadata.uid}')"
for _ in $(seq 1 240); do
    served="$(kubectl get --raw "/api/v1/namespaces/tokengo/pods/llm-exit-0:9090/proxy/status" 2>/dev/null \
        | python3 -c 'import json, sys; print(next(k["key_id"] for k in json.load(sys.stdin)["exit"]["keys"] if k["slot"] == "current"))' \
        2>/dev/null || true)"
    [[ "$served" == "$new_key" ]] && break
    sleep 1
done
[[ "$served" == "$new_key" ]] || { echo "the exit pod never served key $new_key (serves ${served:-nothing})"; exit 1; }
echo "the running exit pod serves key $new_key"
[[ "$(kubectl -n tokengo get pod llm-exit-0 -o jsonpath='{.metadata.uid} {.status.containerStatuses[0].restartCount}')" == "$exit_uid 0" ]] \
    || { echo "the rotation replaced or restarted the exit pod"; exit 1; }
kubectl -n tokengo wait --for=condition=Ready tokengoexit/llm --timeout=60s
stop_load rotation

step "the relay scaled to 3 replicas (merge patch); the exit registers with each pod"
kubectl -n tokengo patch tokengorelay edge --type merge -p '{"spec": {"replicas": 3}}'
kubectl -n tokengo wait --for=jsonpath='{.status.readyReplicas}'=3 "$relay_workload" --timeout=300s
kubectl -n tokengo wait --for=condition=Ready tokengorelay/edge --timeout=300s
wait_exit_registered 3

step "a relay pod deleted under load (3 replicas, one identity): at most the requests in flight on it fail"
# When the deleted pod carries the client's connection, kube-proxy sends the client's flow to
# another pod once the pod is deleted, so the requests in flight on it (one per worker) are
# lost; the client reconnects through another pod at once (tests/k8s_node measures this).
start_load relay-loss 2
victim="$(kubectl -n tokengo get pods -l app.kubernetes.io/component=relay,app.kubernetes.io/instance=edge -o name | head -n 1)"
echo "deleting $victim"
kubectl -n tokengo delete "$victim" --wait=false
# Gone (it drains first), then three ready replicas again.
kubectl -n tokengo wait --for=delete "$victim" --timeout=180s
kubectl -n tokengo wait --for=jsonpath='{.status.readyReplicas}'=3 "$relay_workload" --timeout=300s
kubectl -n tokengo wait --for=condition=Ready tokengorelay/edge --timeout=300s
wait_exit_registered 3
stop_load relay-loss

step "delete: the garbage collector removes every child; both identity Secrets are kept"
kill "$client_pid" 2>/dev/null || true
client_pid=""
kubectl -n tokengo delete tokengoexit llm --wait=true
kubectl -n tokengo delete tokengorelay edge --wait=true
for _ in $(seq 1 120); do
    left="$(kubectl -n tokengo get deploy,sts,svc,pdb -l app.kubernetes.io/managed-by=tokengo-operator -o name)"
    [[ -z "$left" ]] && break
    sleep 1
done
[[ -z "$left" ]] || { echo "children left behind: $left"; exit 1; }
# retainIdentity defaults to true on both kinds: a re-created relay keeps its address, an exit
# its PeerIds and keys.
kubectl -n tokengo get secret edge-relay-identity llm-exit-keys -o name \
    || { echo "an identity Secret was not kept"; exit 1; }

step "helm uninstall"
helm uninstall tokengo --namespace tokengo-system --wait
echo "kind end-to-end: passed"
