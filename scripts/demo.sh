#!/usr/bin/env bash
# Installs what is needed, brings the miniature cluster up, shows it, makes a
# request from one pod to another Service by name, connects the laptop
# namespace with `burrow connect` and reaches a Service from it, reroutes the
# echo Service to a server on the laptop (a pod's curl reaches the laptop),
# gives it back with --stop, prints echo's environment (`burrow env`), runs a
# local echo as the workload with its traffic (`burrow run --reroute`), and
# tears it all down.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build -p burrow-tests -p burrow-gateway -p burrow

MC=target/debug/minicluster
trap '$MC down --name demo >/dev/null 2>&1 || true' EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "bringing the miniature cluster up"
$MC up --name demo
KUBECONFIG_HOST=$($MC kubeconfig --name demo --host)

step "kubectl get pods,svc -A"
kubectl --kubeconfig "$KUBECONFIG_HOST" get pods,svc -A -o wide

CALLER=$(kubectl --kubeconfig "$KUBECONFIG_HOST" get pods -n default -l app=caller -o jsonpath='{.items[0].metadata.name}')
step "from pod $CALLER: curl http://echo.default:8080/hello (a Service by name, through cluster DNS and kube-proxy)"
# Right after `up`, kube-proxy may not have programmed the newest ready
# endpoints yet (as on a real cluster): a refused connection is tried again.
RETRY=(--retry 10 --retry-connrefused --retry-delay 1)
$MC exec --name demo "pod/default/$CALLER" -- curl -sS --max-time 5 "${RETRY[@]}" http://echo.default:8080/hello
echo

step "from pod $CALLER: curl -I http://web"
$MC exec --name demo "pod/default/$CALLER" -- curl -sS --max-time 5 "${RETRY[@]}" -I http://web

step "from the laptop namespace the cluster is out of reach until burrow connects"
if $MC exec --name demo laptop -- curl -sS --max-time 2 http://10.96.0.1 >/dev/null 2>&1; then
    echo "unexpected: the laptop reached a ClusterIP without burrow" >&2
    exit 1
fi
echo "10.96.0.1 unreachable from the laptop, as expected"

# burrow's state goes in a temp dir so the demo never touches /run/burrow.
RUN_DIR=$(mktemp -d /tmp/burrow-demo.XXXXXX)
KUBECONFIG_LAPTOP=$($MC kubeconfig --name demo)
lap() { $MC exec --name demo laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$@"; }
trap 'lap target/debug/burrow disconnect >/dev/null 2>&1 || true; $MC down --name demo >/dev/null 2>&1 || true; rm -rf "$RUN_DIR"' EXIT

step "in the laptop: sudo burrow connect (installs the gateway, opens the tunnel)"
lap target/debug/burrow connect --kubeconfig "$KUBECONFIG_LAPTOP"

step "from the laptop: curl -I http://web (a Service by its short name, through burrow's DNS stub)"
lap curl -sS --max-time 5 -I http://web/

step "from the laptop: curl http://echo.default:8080/hello, and a corporate name still resolves"
lap curl -sS --max-time 5 http://echo.default:8080/hello
lap getent hosts intranet.example

step "burrow status"
lap target/debug/burrow status

step "in the laptop: a local server on 127.0.0.1:3000, and burrow reroute echo --port 8080:3000"
$MC exec --name demo laptop -- env POD_NAME=the-laptop PORT=3000 target/debug/mc-echo >/dev/null 2>&1 &
LOCAL_ECHO=$!
for _ in $(seq 50); do lap curl -sf http://127.0.0.1:3000/healthz >/dev/null 2>&1 && break; sleep 0.1; done
lap target/debug/burrow reroute echo --port 8080:3000 --kubeconfig "$KUBECONFIG_LAPTOP"
lap target/debug/burrow reroute --list

step "from pod $CALLER: curl http://echo.default:8080/hello now reaches the laptop (\"pod\": \"the-laptop\")"
$MC exec --name demo "pod/default/$CALLER" -- curl -sS --max-time 5 http://echo.default:8080/hello
echo

step "burrow reroute --stop echo: the Service is given back, the cluster's pods answer again"
lap target/debug/burrow reroute --stop echo
$MC exec --name demo "pod/default/$CALLER" -- curl -sS --max-time 5 --retry 5 --retry-connrefused --retry-delay 1 http://echo.default:8080/hello
echo
kill "$LOCAL_ECHO" 2>/dev/null || true

step "burrow env deploy/echo: the environment echo's pods get (ConfigMap, Secret, pod fields; service links left out here)"
lap target/debug/burrow env deploy/echo --kubeconfig "$KUBECONFIG_LAPTOP" | grep -v -e '_PORT' -e '_SERVICE_'

step "burrow run deploy/echo --reroute 8080 -- mc-echo: a local build as echo, with its environment and its traffic"
lap target/debug/burrow run deploy/echo --kubeconfig "$KUBECONFIG_LAPTOP" --reroute 8080 -- \
  sh -c 'echo "local echo sees GREETING=$GREETING"; POD_NAME=burrow-run-on-the-laptop exec target/debug/mc-echo' &
RUN_PID=$!
for _ in $(seq 100); do
  $MC exec --name demo "pod/default/$CALLER" -- curl -sf --max-time 2 http://echo.default:8080/hello 2>/dev/null | grep -q burrow-run-on-the-laptop && break
  sleep 0.2
done
$MC exec --name demo "pod/default/$CALLER" -- curl -sS --max-time 5 http://echo.default:8080/hello
echo

step "the command ends (SIGTERM to burrow run): echo is given back"
pkill -TERM -f "^target/debug/burrow run deploy/echo" || true
wait "$RUN_PID" 2>/dev/null || true
$MC exec --name demo "pod/default/$CALLER" -- curl -sS --max-time 5 --retry 5 --retry-connrefused --retry-delay 1 http://echo.default:8080/hello
echo

step "burrow disconnect, burrow uninstall"
lap target/debug/burrow disconnect
lap target/debug/burrow uninstall --kubeconfig "$KUBECONFIG_LAPTOP"
rm -rf "$RUN_DIR"

step "tearing down"
$MC down --name demo
trap - EXIT
echo "demo: done"
