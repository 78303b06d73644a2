//! The real `kubectl` against the stand-in API server on loopback.

use std::path::PathBuf;
use std::process::Output;

use minicluster_apiserver::admission;
use minicluster_apiserver::local::LocalServer;
use minicluster_apiserver::resources::must;
use serde_json::json;

fn kubectl_path() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubectl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("BURROW_E2E").as_deref() == Ok("1") {
            panic!("kubectl is not on PATH and BURROW_E2E=1 requires it");
        }
        eprintln!("SKIPPED: kubectl is not on PATH");
    }
    found
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).await.expect("write stdin");
        }
        drop(input);
        let out =
            tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
                .await
                .expect("kubectl timed out")
                .expect("kubectl");
        eprintln!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    async fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin).await;
        assert_eq!(out.status.code(), Some(1), "kubectl {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    }
}

const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  labels:
    app: echo
spec:
  replicas: 2
  selector:
    matchLabels:
      app: echo
  template:
    metadata:
      labels:
        app: echo
    spec:
      containers:
      - name: echo
        image: burrow/echo:1
        ports:
        - containerPort: 8080
        env:
        - name: A
          value: "1"
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector:
    app: echo
  ports:
  - name: http
    port: 80
    targetPort: 8080
"#;

const SVC_READER: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: svc-reader
rules:
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: bob-svc
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: svc-reader
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: Group
  name: devs
"#;

const BOB_VIEW: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: bob-view
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: view
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: bob
"#;

fn seed(server: &LocalServer) {
    let store = &server.store;
    let pod = admission::create(
        store,
        must("core/v1/pods"),
        "default",
        json!({"metadata": {"name": "web-1", "labels": {"app": "web"}},
               "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "nginx:1.27"}]}}),
    )
    .expect("pod");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    minicluster_apiserver::admission::update(
        store,
        must("core/v1/pods"),
        "default",
        &name,
        json!({"status": {"phase": "Running", "podIP": "10.244.0.5",
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "nginx:1.27", "imageID": "", "state": {"running": {}}}]}}),
        true,
    )
    .expect("status");
    admission::create(
        store,
        must("core/v1/services"),
        "default",
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
    )
    .expect("svc");
    store
        .create(
            must("core/v1/endpoints"),
            "default",
            json!({"metadata": {"name": "web"}, "subsets": [{"addresses": [{"ip": "10.244.0.5"}], "ports": [{"port": 80, "protocol": "TCP"}]}]}),
        )
        .expect("endpoints");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_against_the_stand_in() {
    let Some(bin) = kubectl_path() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = LocalServer::start(dir.path()).await.expect("server");
    seed(&server);
    let k = Kubectl {
        bin: bin.clone(),
        kubeconfig: server.kubeconfig.clone(),
        cache: dir.path().join("cache"),
    };

    let out = k.ok(&["version", "-o", "json"], None).await;
    assert!(out.contains("v1.32.0"), "{out}");

    let out = k.ok(&["api-resources"], None).await;
    assert!(
        out.contains("pods") && out.contains("po") && out.contains("deployments"),
        "{out}"
    );

    let out = k
        .ok(&["get", "pods,svc,endpoints", "-A", "-o", "wide"], None)
        .await;
    for want in [
        "NAMESPACE",
        "READY",
        "STATUS",
        "RESTARTS",
        "NOMINATED NODE",
        "READINESS GATES",
        "web-1",
        "1/1",
        "Running",
        "10.244.0.5",
        "node-1",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "SELECTOR",
        "ClusterIP",
        "80/TCP",
        "app=web",
        "10.96.0.1",
        "443/TCP",
        "ENDPOINTS",
        "10.244.0.5:80",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }

    // apply: create, then update (strategic merge patch).
    let out = k.ok(&["apply", "-f", "-"], Some(APP)).await;
    assert!(
        out.contains("deployment.apps/echo created") && out.contains("service/echo created"),
        "{out}"
    );
    let changed = APP
        .replace("burrow/echo:1", "burrow/echo:2")
        .replace("value: \"1\"", "value: \"2\"");
    let out = k.ok(&["apply", "-f", "-"], Some(&changed)).await;
    assert!(
        out.contains("deployment.apps/echo configured") && out.contains("service/echo unchanged"),
        "{out}"
    );
    let d = server
        .store
        .get(must("apps/v1/deployments"), "default", "echo")
        .expect("deployment");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "burrow/echo:2");
    assert_eq!(c["env"], json!([{"name": "A", "value": "2"}]));
    assert_eq!(d["metadata"]["generation"], 2);
    let out = k.ok(&["get", "deploy", "-o", "wide"], None).await;
    assert!(
        out.contains("UP-TO-DATE") && out.contains("burrow/echo:2") && out.contains("app=echo"),
        "{out}"
    );

    // patch in three flavours.
    let out = k
        .ok(
            &[
                "patch",
                "svc",
                "echo",
                "-p",
                r#"{"spec":{"selector":{"app":"y"}}}"#,
            ],
            None,
        )
        .await;
    assert!(out.contains("service/echo patched"), "{out}");
    let ip_before = server
        .store
        .get(must("core/v1/services"), "default", "echo")
        .expect("svc")["spec"]["clusterIP"]
        .clone();
    k.ok(
        &[
            "patch",
            "svc",
            "echo",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"x":"1"}}}"#,
        ],
        None,
    )
    .await;
    k.ok(
        &[
            "patch",
            "svc",
            "echo",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/ports/0/port","value":81}]"#,
        ],
        None,
    )
    .await;
    let svc = server
        .store
        .get(must("core/v1/services"), "default", "echo")
        .expect("svc");
    assert_eq!(svc["spec"]["selector"], json!({"app": "y"}));
    assert_eq!(svc["metadata"]["labels"]["x"], "1");
    assert_eq!(svc["spec"]["ports"][0]["port"], 81);
    assert_eq!(svc["spec"]["clusterIP"], ip_before);

    // Errors.
    let err = k.fails(&["get", "svc", "missing"], None).await;
    assert!(
        err.contains(r#"Error from server (NotFound): services "missing" not found"#),
        "{err}"
    );
    let err = k.fails(&["create", "-f", "-"], Some(APP)).await;
    assert!(err.contains("AlreadyExists"), "{err}");
    let err = k
        .fails(
            &["create", "-f", "-"],
            Some("apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  clusterIP: 1.2.3.4\n  ports:\n  - port: 80\n"),
        )
        .await;
    assert!(
        err.contains("The range of valid IPs is 10.96.0.0/12"),
        "{err}"
    );

    // Delete.
    let out = k.ok(&["delete", "pod", "web-1"], None).await;
    assert!(out.contains(r#"pod "web-1" deleted"#), "{out}");

    // Server-side apply.
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n";
    let out = k.ok(&["apply", "--server-side", "-f", "-"], Some(cm)).await;
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    let out = k
        .ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&cm.replace("\"1\"", "\"2\"")),
        )
        .await;
    assert!(out.contains("configmap/ssa serverside-applied"), "{out}");
    let cmv = server
        .store
        .get(must("core/v1/configmaps"), "default", "ssa")
        .expect("cm");
    assert_eq!(cmv["data"]["a"], "2");
    assert_eq!(cmv["metadata"]["managedFields"][0]["manager"], "kubectl");

    // Typed generators send protobuf bodies.
    k.ok(&["create", "namespace", "team-a"], None).await;
    k.ok(
        &[
            "create",
            "deployment",
            "web",
            "-n",
            "team-a",
            "--image=nginx:1.27",
            "--port=80",
            "--replicas=2",
        ],
        None,
    )
    .await;
    k.ok(
        &[
            "create",
            "service",
            "clusterip",
            "web",
            "-n",
            "team-a",
            "--tcp=80:8080",
        ],
        None,
    )
    .await;
    k.ok(
        &[
            "create",
            "configmap",
            "cfg",
            "-n",
            "team-a",
            "--from-literal=a=b",
        ],
        None,
    )
    .await;
    k.ok(
        &[
            "create",
            "secret",
            "generic",
            "sec",
            "-n",
            "team-a",
            "--from-literal=pw=hunter2",
        ],
        None,
    )
    .await;
    k.ok(&["create", "serviceaccount", "robot", "-n", "team-a"], None)
        .await;
    let d = server
        .store
        .get(must("apps/v1/deployments"), "team-a", "web")
        .expect("deployment");
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.27"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["ports"][0],
        json!({"containerPort": 80, "protocol": "TCP"})
    );
    assert_eq!(d["spec"]["selector"]["matchLabels"], json!({"app": "web"}));
    let s = server
        .store
        .get(must("core/v1/services"), "team-a", "web")
        .expect("service");
    assert_eq!(s["spec"]["ports"][0]["port"], 80);
    assert_eq!(s["spec"]["ports"][0]["targetPort"], 8080);
    assert!(
        s["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.")),
        "{s}"
    );
    let sec = server
        .store
        .get(must("core/v1/secrets"), "team-a", "sec")
        .expect("secret");
    assert_eq!(sec["data"]["pw"], "aHVudGVyMg==");
    let out = k
        .ok(
            &["scale", "deployment", "web", "-n", "team-a", "--replicas=3"],
            None,
        )
        .await;
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    let d = server
        .store
        .get(must("apps/v1/deployments"), "team-a", "web")
        .expect("deployment");
    assert_eq!(d["spec"]["replicas"], 3);
    let out = k.ok(&["get", "all", "-n", "team-a"], None).await;
    assert!(
        out.contains("deployment.apps/web") && out.contains("service/web"),
        "{out}"
    );
    k.ok(&["describe", "svc", "web", "-n", "team-a"], None)
        .await;
    k.ok(&["get", "svc", "web", "-n", "team-a", "-o", "yaml"], None)
        .await;
    let out = k.ok(&["delete", "namespace", "team-a"], None).await;
    assert!(out.contains(r#"namespace "team-a" deleted"#), "{out}");
    assert!(
        server
            .store
            .get(must("apps/v1/deployments"), "team-a", "web")
            .is_err()
    );

    // RBAC: a user without rights.
    let bob = Kubectl {
        bin,
        kubeconfig: server.kubeconfig_for("bob", &["devs"]).expect("bob"),
        cache: dir.path().join("cache-bob"),
    };
    let err = bob.fails(&["get", "pods"], None).await;
    assert!(
        err.contains(r#"User "bob" cannot list resource "pods""#),
        "{err}"
    );
    // kubectl patch GETs the object first: allow reading services only.
    k.ok(&["apply", "-f", "-"], Some(SVC_READER)).await;
    bob.ok(&["get", "svc", "echo"], None).await;
    let err = bob
        .fails(
            &[
                "patch",
                "svc",
                "echo",
                "-p",
                r#"{"spec":{"selector":{"app":"z"}}}"#,
            ],
            None,
        )
        .await;
    assert!(
        err.contains(r#"Error from server (Forbidden): services "echo" is forbidden: User "bob" cannot patch resource "services" in API group "" in the namespace "default""#),
        "{err}"
    );
    let out = bob.ok(&["auth", "can-i", "get", "services"], None).await;
    assert_eq!(out.trim(), "yes");
    let out = bob.run(&["auth", "can-i", "patch", "services"], None).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");
    let out = bob.ok(&["auth", "whoami"], None).await;
    assert!(out.contains("bob") && out.contains("devs"), "{out}");
    // ... and pods until bound to `view`.
    k.ok(&["apply", "-f", "-"], Some(BOB_VIEW)).await;
    bob.ok(&["get", "pods"], None).await;
}

const LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: listed-a
  data:
    a: "1"
- apiVersion: v1
  kind: Service
  metadata:
    name: listed-svc
  spec:
    ports:
    - port: 80
"#;

/// Dropped with the log stream it rides along: tells the test the client
/// went away.
struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `kind: List` files (kubectl validates them with OpenAPI v2) and
/// `kubectl logs` against a stand-in node whose logs describe the options
/// the API server passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_list_and_logs() {
    use futures::StreamExt;
    use minicluster_apiserver::logs::{LogOptions, LogSource, LogStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(bin) = kubectl_path() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = Arc::new(AtomicBool::new(false));
    let flag = gone.clone();
    let logs: LogSource = Arc::new(move |pod: serde_json::Value, o: LogOptions| {
        let flag = flag.clone();
        Box::pin(async move {
            let head = format!(
                "pod={} container={} follow={} previous={} timestamps={} tail={:?} since={}\n",
                pod["metadata"]["name"].as_str().unwrap_or(""),
                o.container,
                o.follow,
                o.previous,
                o.timestamps,
                o.tail_lines,
                o.since.is_some(),
            );
            let head = futures::stream::iter([bytes::Bytes::from(head)]);
            if !o.follow {
                return Ok(head.boxed() as LogStream);
            }
            let guard = DropFlag(flag);
            let ticks = futures::stream::unfold((0u32, guard), |(n, guard)| async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Some((bytes::Bytes::from(format!("tick {n}\n")), (n + 1, guard)))
            });
            Ok(head.chain(ticks).boxed())
        })
    });
    let server = LocalServer::start_with_logs(
        dir.path(),
        Arc::new(minicluster_apiserver::Store::new()),
        minicluster_apiserver::server::direct_dialer(),
        Some(logs),
    )
    .await
    .expect("server");
    seed(&server);
    let k = Kubectl {
        bin,
        kubeconfig: server.kubeconfig.clone(),
        cache: dir.path().join("cache"),
    };

    // A List is split by kubectl, each item validated against OpenAPI v2.
    let out = k.ok(&["apply", "-f", "-"], Some(LIST)).await;
    assert!(
        out.contains("configmap/listed-a created") && out.contains("service/listed-svc created"),
        "{out}"
    );
    let changed = LIST.replace("a: \"1\"", "a: \"2\"");
    let run = k.run(&["apply", "-f", "-"], Some(&changed)).await;
    let (out, err) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{err}");
    assert!(
        out.contains("configmap/listed-a configured")
            && out.contains("service/listed-svc unchanged"),
        "{out}"
    );
    assert!(!err.contains("warning"), "re-applying a List warns: {err}");
    let cm = server
        .store
        .get(must("core/v1/configmaps"), "default", "listed-a")
        .expect("cm");
    assert_eq!(cm["data"]["a"], "2");
    let out = k.ok(&["delete", "-f", "-"], Some(LIST)).await;
    assert!(out.contains("listed-svc"), "{out}");

    // Logs: the options arrive; the container is defaulted.
    let out = k.ok(&["logs", "web-1"], None).await;
    assert_eq!(
        out,
        "pod=web-1 container=web follow=false previous=false timestamps=false tail=None since=false\n"
    );
    let out = k
        .ok(
            &[
                "logs",
                "web-1",
                "-c",
                "web",
                "--tail=3",
                "--timestamps",
                "--since=10m",
                "--previous",
            ],
            None,
        )
        .await;
    assert_eq!(
        out,
        "pod=web-1 container=web follow=false previous=true timestamps=true tail=Some(3) since=true\n"
    );
    let out = k.ok(&["logs", "web-1", "--limit-bytes=9"], None).await;
    assert_eq!(out, "pod=web-1");
    let err = k.fails(&["logs", "web-1", "-c", "nope"], None).await;
    // (kubectl checks this one itself; the server says the same.)
    assert!(
        err.contains("container nope is not valid for pod web-1"),
        "{err}"
    );
    let err = k.fails(&["logs", "missing"], None).await;
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    // Follow streams until the client goes; the node's stream is dropped.
    let mut follow = tokio::process::Command::new(&k.bin)
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args(["logs", "-f", "web-1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl logs -f");
    let mut stdout = follow.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let read_ticks = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("tick 3\n") {
            let n = stdout.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "follow ended early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), read_ticks)
        .await
        .expect("ticks in time");
    assert!(String::from_utf8_lossy(&seen).starts_with("pod=web-1 container=web follow=true"));
    assert!(!gone.load(Ordering::SeqCst), "dropped while following");
    follow.kill().await.expect("kill kubectl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gone.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the node's log stream outlived the client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: gateway
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: gateway
  ingress:
  - ports:
    - protocol: UDP
      port: wireguard
  - from:
    - namespaceSelector: {}
    ports:
    - port: 32768
      endPort: 60999
"#;

const DEVELOPER_ROLE: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: rerouter
rules:
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "patch"]
"#;

/// NetworkPolicies are served like any kind (stored, validated, listed
/// across namespaces), and a ClusterRole bound with `kubectl create
/// rolebinding --clusterrole` grants in that namespace only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_network_policies_and_namespaced_cluster_roles() {
    let Some(bin) = kubectl_path() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = LocalServer::start(dir.path()).await.expect("server");
    seed(&server);
    let k = Kubectl {
        bin: bin.clone(),
        kubeconfig: server.kubeconfig.clone(),
        cache: dir.path().join("cache"),
    };
    let out = k.ok(&["api-resources"], None).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("networkpolicies") && l.contains("netpol")),
        "{out}"
    );
    let out = k.ok(&["apply", "-f", "-"], Some(POLICY)).await;
    assert!(
        out.contains("networkpolicy.networking.k8s.io/gateway created"),
        "{out}"
    );
    let out = k.ok(&["get", "networkpolicy", "-A"], None).await;
    let header = out.lines().next().unwrap_or_default();
    for col in ["NAMESPACE", "NAME", "POD-SELECTOR", "AGE"] {
        assert!(header.contains(col), "{out}");
    }
    assert!(
        out.lines().any(|l| l.starts_with("default")
            && l.contains("gateway")
            && l.contains("app=gateway")),
        "{out}"
    );
    let stored = server
        .store
        .get(
            must("networking.k8s.io/v1/networkpolicies"),
            "default",
            "gateway",
        )
        .expect("stored");
    assert_eq!(stored["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(stored["spec"]["ingress"][1]["ports"][0]["protocol"], "TCP");
    let bad = POLICY.replace("endPort: 60999", "endPort: 80");
    let err = k.fails(&["apply", "-f", "-"], Some(&bad)).await;
    assert!(
        err.contains("spec.ingress[1].ports[0].endPort: Invalid value")
            && err.contains("must be greater than or equal to `port`"),
        "{err}"
    );
    let out = k.ok(&["delete", "networkpolicy", "gateway"], None).await;
    assert!(out.contains("deleted"), "{out}");

    k.ok(&["create", "namespace", "team"], None).await;
    k.ok(&["apply", "-f", "-"], Some(DEVELOPER_ROLE)).await;
    let out = k
        .ok(
            &[
                "-n",
                "team",
                "create",
                "rolebinding",
                "carol-rerouter",
                "--clusterrole=rerouter",
                "--user=carol",
            ],
            None,
        )
        .await;
    assert!(out.contains("carol-rerouter created"), "{out}");
    let carol = Kubectl {
        bin,
        kubeconfig: server.kubeconfig_for("carol", &[]).expect("kubeconfig"),
        cache: dir.path().join("cache-carol"),
    };
    let yes = carol
        .ok(&["auth", "can-i", "patch", "services", "-n", "team"], None)
        .await;
    assert_eq!(yes.trim(), "yes");
    let refused: [&[&str]; 3] = [
        &["auth", "can-i", "patch", "services", "-n", "default"],
        &["auth", "can-i", "delete", "services", "-n", "team"],
        &["auth", "can-i", "patch", "services", "-A"],
    ];
    for args in refused {
        let no = carol.run(args, None).await;
        assert_eq!(String::from_utf8_lossy(&no.stdout).trim(), "no", "{args:?}");
    }
}
