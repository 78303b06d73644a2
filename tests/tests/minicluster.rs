//! Acceptance of the miniature cluster (issue 2): kubectl, kube-rs, traffic
//! inside the cluster, and the laptop's isolation — one test per point, one
//! cluster for the binary (`cargo test --test minicluster traffic_from_a_pod`
//! runs one point alone).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_tests::cluster::Cluster;
use common::*;

const EXTRA_YAML: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: extra
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {app: extra}
  template:
    metadata:
      labels: {app: extra}
    spec:
      containers:
      - name: nginx
        image: nginx:1.25
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: extra
  namespace: default
spec:
  selector: {app: extra}
  ports:
  - port: 80
    targetPort: 80
"#;

// Each point is its own test over the binary's one cluster (common::shared),
// in any order: a point that leaves the cluster changed for a while (a
// deleted web or udp-echo pod until its replacement is ready) takes it
// alone; every other point creates only objects of its own and removes them.

/// The binary's cluster, shared with the other points.
fn acc() -> Option<SharedCluster> {
    shared_cluster("acc", 1)
}

/// The binary's cluster, for a point that changes it for a while.
fn acc_alone() -> Option<SharedCluster> {
    shared_cluster_alone("acc", 1)
}

#[test]
fn kubectl_reads_everything() {
    let Some(ref c) = acc() else { return };
    let out = ok(kubectl(
        c,
        &["get", "pods,svc,endpoints", "-A", "-o", "wide"],
    ));
    for want in [
        "web-",
        "echo-",
        "redis-",
        "db-0",
        "caller",
        "kube-dns",
        "10.96.0.10",
        "10.244.",
        "node-1",
        "Running",
    ] {
        assert!(
            out.contains(want),
            "`kubectl get pods,svc,endpoints -A -o wide` lacks {want:?}:\n{out}"
        );
    }
}

fn ready_replicas(c: &Cluster, ns: &str, deploy: &str) -> String {
    stdout(&run(kubectl(
        c,
        &[
            "get",
            "deploy",
            deploy,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
    )))
}

#[test]
fn kubectl_apply_patch_delete() {
    let Some(ref c) = acc_alone() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("extra.yaml");
    std::fs::write(&file, EXTRA_YAML).expect("write yaml");
    let file = file.to_string_lossy().into_owned();
    let out = ok(kubectl(c, &["apply", "-f", &file]));
    assert!(out.contains("deployment.apps/extra created"), "{out}");
    assert!(out.contains("service/extra created"), "{out}");
    eventually(Duration::from_secs(30), "extra deployment ready", || {
        (ready_replicas(c, "default", "extra") == "1").then_some(())
    });
    let body = eventually(
        Duration::from_secs(10),
        "curl http://extra from caller",
        || {
            let o = run(in_caller(
                c,
                &["curl", "-sS", "--max-time", "2", "http://extra/"],
            ));
            o.status.success().then(|| stdout(&o))
        },
    );
    assert!(
        body.to_lowercase().contains("html"),
        "nginx index expected, got {body}"
    );

    // Re-apply unchanged: a no-op the way kubectl reports it.
    let out = ok(kubectl(c, &["apply", "-f", &file]));
    assert!(
        out.contains("unchanged") || out.contains("configured"),
        "{out}"
    );

    // Patch selector and targetPort: traffic follows to the echo pods.
    let start = Instant::now();
    ok(kubectl(
        c,
        &[
            "patch",
            "svc",
            "extra",
            "-p",
            r#"{"spec":{"selector":{"app":"echo"},"ports":[{"port":80,"targetPort":8080}]}}"#,
        ],
    ));
    eventually(
        Duration::from_secs(10),
        "traffic to follow the patched Service",
        || {
            let o = run(in_caller(
                c,
                &["curl", "-sS", "--max-time", "2", "http://extra/"],
            ));
            stdout(&o).contains("\"pod\"").then_some(())
        },
    );
    eprintln!(
        "traffic followed the Service patch after {:?}",
        start.elapsed()
    );
    let sel = ok(kubectl(
        c,
        &[
            "get",
            "svc",
            "extra",
            "-o",
            "jsonpath={.spec.selector.app} {.spec.ports[0].targetPort}",
        ],
    ));
    assert_eq!(sel.trim(), "echo 8080");

    // Merge and JSON patches too.
    ok(kubectl(
        c,
        &[
            "patch",
            "svc",
            "extra",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"patched":"merge"}}}"#,
        ],
    ));
    ok(kubectl(
        c,
        &[
            "patch",
            "svc",
            "extra",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/metadata/labels/json","value":"yes"}]"#,
        ],
    ));
    let labels = ok(kubectl(
        c,
        &[
            "get",
            "svc",
            "extra",
            "-o",
            "jsonpath={.metadata.labels.patched} {.metadata.labels.json}",
        ],
    ));
    assert_eq!(labels.trim(), "merge yes");

    // Delete a pod of a Deployment: it is replaced.
    let victim = pod_of(c, "default", "web");
    let out = ok(kubectl(c, &["delete", "pod", &victim, "-n", "default"]));
    assert!(out.contains(&format!("pod \"{victim}\" deleted")), "{out}");
    eventually(
        Duration::from_secs(30),
        "web to have 2 ready pods again",
        || {
            let names = stdout(&run(kubectl(
                c,
                &[
                    "get",
                    "pods",
                    "-l",
                    "app=web",
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ],
            )));
            (!names.contains(&victim) && ready_replicas(c, "default", "web") == "2").then_some(())
        },
    );
    ok(kubectl(c, &["delete", "-f", &file]));
}

#[test]
fn kubectl_errors_are_real_statuses() {
    let Some(ref c) = acc() else { return };
    let o = run(kubectl(
        c,
        &["get", "svc", "no-such-service", "-n", "default"],
    ));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Error from server (NotFound): services \"no-such-service\" not found"),
        "{}",
        stderr(&o)
    );
    let o = run(kubectl(c, &["create", "namespace", "default"]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("AlreadyExists"), "{}", stderr(&o));
}

#[test]
fn rbac_refuses_a_user_without_patch() {
    let Some(ref c) = acc() else { return };
    let mut cmd = std::process::Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(c.limited_host_kubeconfig());
    let mut get = cmd;
    get.args(["get", "svc", "echo", "-n", "default", "-o", "name"]);
    assert_eq!(ok(get).trim(), "service/echo", "the limited user may read");
    let mut patch = std::process::Command::new("kubectl");
    patch
        .arg("--kubeconfig")
        .arg(c.limited_host_kubeconfig())
        .args([
            "patch",
            "svc",
            "echo",
            "-n",
            "default",
            "-p",
            r#"{"spec":{"selector":{"app":"x"}}}"#,
        ]);
    let o = run(patch);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("Forbidden") && err.contains("cannot patch resource \"services\""),
        "{err}"
    );
    let sel = ok(kubectl(
        c,
        &["get", "svc", "echo", "-o", "jsonpath={.spec.selector.app}"],
    ));
    assert_eq!(sel.trim(), "echo", "a refused patch changes nothing");
}

#[test]
fn traffic_from_a_pod() {
    let Some(ref c) = acc() else { return };
    for url in [
        "http://web/",
        "http://web.default/",
        "http://web.default.svc.cluster.local/1k.bin",
    ] {
        ok(in_caller(
            c,
            &["curl", "-sSf", "--max-time", "5", "-o", "/dev/null", url],
        ));
    }
    let body = ok(in_caller(
        c,
        &[
            "curl",
            "-sSf",
            "--max-time",
            "5",
            "-H",
            "X-Burrow-Test: hello",
            "http://echo.default.svc.cluster.local:8080/path",
        ],
    ));
    assert!(
        body.to_lowercase().contains("x-burrow-test"),
        "echo must show the request headers: {body}"
    );
    assert!(body.contains("echo-"), "echo must name its pod: {body}");

    let pong = ok(in_caller(c, &["redis-cli", "-h", "redis.data", "ping"]));
    assert_eq!(pong.trim(), "PONG");

    let mut udp = in_caller(c, &["socat", "-t", "2", "-", "UDP:udp-echo:9000"]);
    udp.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = udp.spawn().expect("socat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"over udp\n")
        .expect("write");
    let o = child.wait_with_output().expect("socat output");
    assert_eq!(stdout(&o), "over udp\n", "udp-echo: {}", stderr(&o));

    let db_ip = ok(kubectl(
        c,
        &[
            "get",
            "pod",
            "db-0",
            "-n",
            "data",
            "-o",
            "jsonpath={.status.podIP}",
        ],
    ));
    let hosts = ok(in_caller(
        c,
        &["getent", "hosts", "db-0.db.data.svc.cluster.local"],
    ));
    assert!(
        hosts.starts_with(db_ip.trim()),
        "db-0 resolves to {hosts}, pod IP {db_ip}"
    );

    let srv = ok(in_caller(
        c,
        &[
            "dig",
            "+short",
            "SRV",
            "_http._tcp.echo.default.svc.cluster.local",
        ],
    ));
    assert!(
        srv.contains(" 8080 ") && srv.contains("echo.default.svc.cluster.local"),
        "SRV answer: {srv}"
    );

    let nx = run(in_caller(c, &["dig", "nosuch.default.svc.cluster.local"]));
    assert!(stdout(&nx).contains("NXDOMAIN"), "{}", stdout(&nx));
}

#[test]
fn laptop_reaches_only_the_underlay() {
    let Some(ref c) = acc() else { return };
    let web_ip = ok(kubectl(
        c,
        &["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"],
    ));
    let web_pod = pod_of(c, "default", "web");
    let pod_ip = ok(kubectl(
        c,
        &["get", "pod", &web_pod, "-o", "jsonpath={.status.podIP}"],
    ));
    for ip in [web_ip.trim(), pod_ip.trim(), "10.96.0.10"] {
        let o = run(c.exec(
            "laptop",
            &["curl", "-sS", "--max-time", "2", &format!("http://{ip}/")],
        ));
        assert!(
            !o.status.success(),
            "the laptop reached {ip} without burrow"
        );
    }
    let mut k = c.exec("laptop", &["kubectl", "--kubeconfig"]);
    k.arg(c.kubeconfig()).args(["get", "ns", "-o", "name"]);
    assert!(
        ok(k).contains("namespace/default"),
        "the API server answers on the underlay"
    );
    let hosts = ok(c.exec("laptop", &["getent", "hosts", "intranet.example"]));
    assert!(
        hosts.starts_with("192.168.240.80"),
        "the laptop's own resolver answers: {hosts}"
    );
}

#[test]
fn kube_rs_client() {
    let Some(ref c) = acc() else { return };
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
    use kube::config::{KubeConfigOptions, Kubeconfig};

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let kc = Kubeconfig::read_from(c.host_kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        let client = kube::Client::try_from(config).expect("client");

        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .expect("list");
        assert_eq!(list.items.len(), 2, "two web pods");
        let rv = list.metadata.resource_version.clone().expect("list rv");

        // Watch sees add, modify, delete of a ConfigMap in order.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let stream = cms
            .watch(
                &WatchParams::default().fields("metadata.name=kube-rs-test"),
                &rv,
            )
            .await
            .expect("watch");
        let mut stream = stream.boxed();
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-rs-test"},
            "data": {"a": "1"}
        }))
        .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
        cms.patch(
            "kube-rs-test",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"b": "2"}})),
        )
        .await
        .expect("merge patch");
        let apply = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-rs-test"},
            "data": {"c": "3"}
        });
        let applied = cms
            .patch(
                "kube-rs-test",
                &PatchParams::apply("burrow-tests").force(),
                &Patch::Apply(apply),
            )
            .await
            .expect("server-side apply");
        assert_eq!(
            applied
                .data
                .as_ref()
                .and_then(|d| d.get("c"))
                .map(String::as_str),
            Some("3")
        );
        let json_patch: kube_json_patch::Patch = serde_json::from_value(
            serde_json::json!([{"op": "add", "path": "/data/d", "value": "4"}]),
        )
        .expect("patch");
        let patched = cms
            .patch(
                "kube-rs-test",
                &PatchParams::default(),
                &Patch::<()>::Json(json_patch),
            )
            .await
            .expect("json patch");
        assert_eq!(
            patched
                .data
                .as_ref()
                .and_then(|d| d.get("d"))
                .map(String::as_str),
            Some("4")
        );
        cms.delete("kube-rs-test", &Default::default())
            .await
            .expect("delete");

        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.last().map(String::as_str) != Some("deleted") {
            let ev = tokio::time::timeout_at(deadline, stream.try_next())
                .await
                .expect("watch events in time")
                .expect("watch stream")
                .expect("watch ended early");
            match ev {
                WatchEvent::Added(_) => seen.push("added".to_string()),
                WatchEvent::Modified(_) => seen.push("modified".to_string()),
                WatchEvent::Deleted(_) => seen.push("deleted".to_string()),
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => panic!("watch error {e:?}"),
            }
        }
        assert_eq!(
            seen,
            ["added", "modified", "modified", "modified", "deleted"]
        );

        // Port-forward to a web pod and fetch a file over it.
        let name = list.items[0].metadata.name.clone().expect("pod name");
        let mut pf = pods.portforward(&name, &[80]).await.expect("portforward");
        let mut stream = pf.take_stream(80).expect("stream");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /1k.bin HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut resp))
            .await
            .expect("read in time")
            .expect("read");
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            &text[..text.len().min(200)]
        );
        let body_at = text.find("\r\n\r\n").expect("headers end") + 4;
        assert_eq!(
            resp.len() - body_at,
            1024,
            "1 KiB body over the port-forward"
        );
        drop(stream);
        pf.abort();
    });
}

#[test]
fn kubectl_applies_a_list() {
    let Some(ref c) = acc() else { return };
    let list = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: listed-a, namespace: default}
  data: {k: "1"}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: listed-b, namespace: default}
  data: {k: "2"}
"#;
    let out = kubectl_apply(c, list);
    assert!(
        out.contains("configmap/listed-a created") && out.contains("configmap/listed-b created"),
        "{out}"
    );
    let o = kubectl_input(
        c,
        &["apply", "-f", "-"],
        &list.replace("k: \"1\"", "k: \"3\""),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("configmap/listed-a configured")
            && stdout(&o).contains("configmap/listed-b unchanged"),
        "{}",
        stdout(&o)
    );
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let k = ok(kubectl(
        c,
        &["get", "cm", "listed-a", "-o", "jsonpath={.data.k}"],
    ));
    assert_eq!(k.trim(), "3");
    let o = kubectl_input(c, &["delete", "-f", "-"], list);
    assert!(
        o.status.success() && stdout(&o).contains("listed-b"),
        "{}",
        stderr(&o)
    );
}

const LOG_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: logger, namespace: default}
spec:
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "echo first-line; echo to-stderr >&2; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: default}
spec:
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "echo run-$(cat /proc/sys/kernel/random/uuid); sleep 1; exit 1"]
"#;

#[test]
fn kubectl_logs() {
    let Some(ref c) = acc() else { return };
    kubectl_apply(c, LOG_PODS);
    wait_pod_ready(c, "default", "logger");
    let all = logs_containing(c, &["logger"], "tick 3\n");
    // stdout and stderr are separate pipes: their lines may interleave.
    let at = |l: &str| all.find(l).unwrap_or(usize::MAX);
    assert!(
        at("first-line\n") < at("tick 1\n") && all.contains("to-stderr\n"),
        "{all}"
    );
    let last = ok(kubectl(c, &["logs", "logger", "--tail=1"]));
    assert!(
        last.starts_with("tick ") && last.lines().count() == 1,
        "{last:?}"
    );
    let stamped = ok(kubectl(c, &["logs", "logger", "--tail=1", "--timestamps"]));
    let (ts, line) = stamped.split_once(' ').expect("timestamp and line");
    assert!(
        ts.len() > 20 && ts.ends_with('Z') && ts.contains('T') && line.starts_with("tick "),
        "{stamped:?}"
    );
    let o = run(kubectl(c, &["logs", "logger", "--previous"]));
    assert!(
        stderr(&o).contains("previous terminated container \"c\" in pod \"logger\" not found"),
        "{}",
        stderr(&o)
    );

    // -f streams what is appended and ends when the pod is deleted.
    let mut follow = kubectl(c, &["logs", "-f", "logger", "--tail=1"]);
    follow.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = follow.spawn().expect("kubectl logs -f");
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let mut out = child.stdout.take().expect("stdout");
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&text);
            }
        })
    };
    let ticks = |s: &str| s.lines().filter(|l| l.starts_with("tick ")).count();
    eventually(Duration::from_secs(20), "kubectl logs -f to stream", || {
        (ticks(&seen.lock().unwrap_or_else(|p| p.into_inner())) >= 5).then_some(())
    });
    ok(kubectl(c, &["delete", "pod", "logger", "--wait=false"]));
    let status = eventually(Duration::from_secs(30), "kubectl logs -f to end", || {
        child.try_wait().expect("try_wait")
    });
    let _ = reader.join();
    assert!(status.success(), "kubectl logs -f: {status}");

    // --previous once the crasher restarted.
    eventually(Duration::from_secs(30), "crasher to restart", || {
        let n = stdout(&run(kubectl(
            c,
            &[
                "get",
                "pod",
                "crasher",
                "-o",
                "jsonpath={.status.containerStatuses[0].restartCount}",
            ],
        )));
        (n.trim().parse::<u32>().unwrap_or(0) >= 1).then_some(())
    });
    let prev = ok(kubectl(c, &["logs", "crasher", "--previous"]));
    assert!(
        prev.starts_with("run-") && prev.lines().count() == 1,
        "{prev:?}"
    );
    ok(kubectl(c, &["delete", "pod", "crasher", "--wait=false"]));
}

#[test]
fn pod_sysctls() {
    let Some(ref c) = acc() else { return };
    // Non-root with no_new_privs: ping works only through an ICMP datagram
    // socket, which ping_group_range allows.
    let ping = "cat /proc/sys/net/ipv4/ping_group_range /proc/sys/net/ipv4/ip_unprivileged_port_start; if ping -c 1 -W 2 10.244.0.1 >/dev/null 2>&1; then echo ping-ok; else echo ping-refused; fi; sleep infinity";
    let yaml = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: sysctl-ok, namespace: default}}
spec:
  securityContext:
    runAsUser: 1000
    sysctls:
    - {{name: net.ipv4.ping_group_range, value: "0 2147483647"}}
    - {{name: net.ipv4.ip_unprivileged_port_start, value: "1024"}}
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "{ping}"]
    securityContext: {{allowPrivilegeEscalation: false}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sysctl-none, namespace: default}}
spec:
  securityContext:
    runAsUser: 1000
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "{ping}"]
    securityContext: {{allowPrivilegeEscalation: false}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sysctl-forbidden, namespace: default}}
spec:
  securityContext:
    sysctls:
    - {{name: net.core.somaxconn, value: "1024"}}
  containers:
  - {{name: c, image: busybox, command: ["sleep", "infinity"]}}
"#
    );
    kubectl_apply(c, &yaml);
    let out = logs_containing(c, &["sysctl-ok"], "ping-");
    assert_eq!(out, "0\t2147483647\n1024\nping-ok\n");
    let out = logs_containing(c, &["sysctl-none"], "ping-");
    assert!(out.ends_with("ping-refused\n"), "{out}");
    let rejected = eventually(Duration::from_secs(20), "sysctl-forbidden rejected", || {
        let o = run(kubectl(
            c,
            &[
                "get",
                "pod",
                "sysctl-forbidden",
                "-o",
                "jsonpath={.status.phase}|{.status.reason}|{.status.message}",
            ],
        ));
        stdout(&o).starts_with("Failed|").then(|| stdout(&o))
    });
    assert_eq!(
        rejected,
        "Failed|SysctlForbidden|Pod was rejected: forbidden sysctl: \"net.core.somaxconn\" not allowlisted"
    );
    let described = ok(kubectl(c, &["describe", "pod", "sysctl-forbidden"]));
    assert!(
        described.contains("SysctlForbidden") && described.contains("kubelet"),
        "{described}"
    );
    ok(kubectl(
        c,
        &[
            "delete",
            "pod",
            "sysctl-ok",
            "sysctl-none",
            "sysctl-forbidden",
            "--wait=false",
        ],
    ));
}

#[test]
fn volumes_leave_the_host_alone() {
    let Some(ref c) = acc() else { return };
    let name = c.name();
    let etc = format!("/etc/mc-{name}-cfg");
    let opt = format!("/opt/mc-{name}");
    let top = format!("/mc-{name}-data");
    let ro = format!("/etc/mc-{name}-written");
    let yaml = format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: host-clean, namespace: default}}
data: {{app.conf: "volume-content"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: host-clean, namespace: default}}
spec:
  volumes:
  - {{name: cfg, configMap: {{name: host-clean}}}}
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "cat {etc}/app.conf {opt}/nested/app.conf {top}/app.conf; echo; if touch {ro} 2>/dev/null; then echo root-writable; else echo root-readonly; fi; sleep infinity"]
    securityContext: {{readOnlyRootFilesystem: true}}
    volumeMounts:
    - {{name: cfg, mountPath: {etc}, readOnly: true}}
    - {{name: cfg, mountPath: {opt}/nested/app.conf, subPath: app.conf}}
    - {{name: cfg, mountPath: {top}}}
"#
    );
    kubectl_apply(c, &yaml);
    let out = logs_containing(c, &["host-clean"], "root-");
    assert_eq!(
        out,
        "volume-contentvolume-contentvolume-content\nroot-readonly\n"
    );
    for p in [&etc, &opt, &top, &ro] {
        assert!(
            !Path::new(p).exists(),
            "{p} exists on the machine while the pod runs"
        );
    }
    ok(kubectl(
        c,
        &["delete", "pod", "host-clean", "--grace-period=1"],
    ));
    ok(kubectl(c, &["delete", "cm", "host-clean"]));
    for p in [&etc, &opt, &top, &ro] {
        assert!(
            !Path::new(p).exists(),
            "{p} left on the machine after the pod"
        );
    }
}

#[test]
fn fs_group_makes_secrets_readable() {
    let Some(ref c) = acc() else { return };
    let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: fsgroup-secret, namespace: default}
stringData: {token: "readable-through-fsgroup"}
---
apiVersion: v1
kind: Pod
metadata: {name: fsgroup, namespace: default}
spec:
  securityContext: {runAsUser: 1000, fsGroup: 2000}
  volumes:
  - name: sec
    secret: {secretName: fsgroup-secret, defaultMode: 288}  # 0440
  containers:
  - name: c
    image: busybox
    command: ["sh", "-c", "id -G; stat -L -c '%a %u:%g' /var/run/secrets/app/token; cat /var/run/secrets/app/token; echo; echo end; sleep infinity"]
    volumeMounts:
    - {name: sec, mountPath: /var/run/secrets/app, readOnly: true}
"#;
    kubectl_apply(c, yaml);
    let out = logs_containing(c, &["fsgroup"], "end\n");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].split_whitespace().any(|g| g == "2000"),
        "fsGroup is a supplementary group: {out}"
    );
    assert_eq!(lines[1], "440 0:2000", "{out}");
    assert_eq!(lines[2], "readable-through-fsgroup", "{out}");
    ok(kubectl(c, &["delete", "pod", "fsgroup", "--wait=false"]));
    ok(kubectl(c, &["delete", "secret", "fsgroup-secret"]));
}

/// A UDP client that keeps sending from one source port reaches the
/// replacement of a deleted udp-echo pod: kube-proxy clears the stale
/// conntrack entry.
#[test]
fn udp_flows_follow_a_replaced_endpoint() {
    let Some(ref c) = acc_alone() else { return };
    use std::net::UdpSocket;
    let cip = ok(kubectl(
        c,
        &["get", "svc", "udp-echo", "-o", "jsonpath={.spec.clusterIP}"],
    ));
    let cip = cip.trim().to_string();
    let caller = c
        .netns(&format!("pod/default/{}", pod_of(c, "default", "caller")))
        .expect("caller netns");
    let sock = burrow_tests::net::in_netns(&caller, || UdpSocket::bind("0.0.0.0:40123"))
        .expect("entering the caller's netns")
        .expect("binding 40123");
    sock.connect(format!("{cip}:9000")).expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut n = 0u32;
    let mut ask = || -> bool {
        n += 1;
        let msg = format!("probe {n}\n");
        if sock.send(msg.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        loop {
            match sock.recv(&mut buf) {
                Ok(len) if &buf[..len] == msg.as_bytes() => return true,
                Ok(_) => continue, // a late answer to an earlier probe
                Err(_) => return false,
            }
        }
    };
    eventually(Duration::from_secs(10), "udp-echo to answer", || {
        ask().then_some(())
    });
    let old = pod_of(c, "default", "udp-echo");
    let old_netns = c
        .netns(&format!("pod/default/{old}"))
        .expect("udp-echo netns");
    ok(kubectl(c, &["delete", "pod", &old, "--wait=false"]));
    // Keep the flow alive (same 5-tuple) until the old pod is gone for good.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new("/run/netns").join(&old_netns).exists() {
        assert!(Instant::now() < deadline, "{old} never went away");
        ask();
    }
    let start = Instant::now();
    eventually(
        Duration::from_secs(20),
        "the same UDP flow to reach the replacement pod",
        || ask().then_some(()),
    );
    eprintln!(
        "udp flow reached the replacement {:?} after the old pod was gone",
        start.elapsed()
    );
    let new = pod_of(c, "default", "udp-echo");
    assert_ne!(new, old);
}

/// A running `kubectl port-forward TARGET :REMOTE...` (kubectl picks the
/// local ports); killed on drop.
struct KubectlPortForward {
    child: std::process::Child,
    /// Local port per remote port, in the order asked.
    ports: Vec<u16>,
    stderr: std::path::PathBuf,
}

impl KubectlPortForward {
    /// Starts it; `websockets: false` makes kubectl use plain SPDY
    /// (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`), else kubectl 1.31+ asks
    /// for SPDY tunneled in a WebSocket first.
    fn start(c: &Cluster, target: &str, remote: &[u16], websockets: bool, tag: &str) -> Self {
        use std::io::BufRead;
        let stderr = std::env::temp_dir().join(format!(
            "burrow-pf-{}-{tag}-{websockets}.log",
            std::process::id()
        ));
        let mut cmd = kubectl(c, &["port-forward", "-v=4", target]);
        for r in remote {
            cmd.arg(format!(":{r}"));
        }
        cmd.env(
            "KUBECTL_PORT_FORWARD_WEBSOCKETS",
            if websockets { "true" } else { "false" },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let mut child = cmd.spawn().expect("kubectl port-forward");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // "Forwarding from 127.0.0.1:LOCAL -> REMOTE"; keep draining.
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                    && let Some((l, r)) = rest.split_once(" -> ")
                    && let (Ok(l), Ok(r)) = (l.parse::<u16>(), r.trim().parse::<u16>())
                {
                    let _ = tx.send((r, l));
                }
            }
        });
        let mut ports = Vec::new();
        for want in remote {
            let (r, l) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| {
                    let _ = child.kill();
                    panic!(
                        "kubectl port-forward {target} did not start:\n{}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    )
                });
            assert_eq!(r, *want, "ports are announced in order");
            ports.push(l);
        }
        KubectlPortForward {
            child,
            ports,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for KubectlPortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// The sha256 of `path` fetched over HTTP from 127.0.0.1:`port`.
fn sha256_over(port: u16, path: &str) -> std::process::Output {
    let mut sh = std::process::Command::new("bash");
    sh.args([
        "-c",
        &format!(
            "set -o pipefail; curl -sSf --max-time 120 http://127.0.0.1:{port}{path} | sha256sum"
        ),
    ]);
    run(sh)
}

/// The sha256 the web root lists for `file`.
fn listed_sha256(c: &Cluster, file: &str) -> String {
    let sums = std::fs::read_to_string(c.state_dir().join("www/SHA256SUMS"))
        .expect("the web root's SHA256SUMS");
    sums.lines()
        .find_map(|l| {
            let (sum, name) = l.split_once("  ")?;
            (name == file).then(|| sum.to_string())
        })
        .unwrap_or_else(|| panic!("{file} not in SHA256SUMS:\n{sums}"))
}

#[test]
fn kubectl_port_forward() {
    let Some(ref c) = acc() else { return };
    let want = listed_sha256(c, "100m.bin");
    let web = pod_of(c, "default", "web");
    let pod = format!("pod/{web}");
    for websockets in [true, false] {
        let mode = if websockets {
            "SPDY tunneled in a WebSocket"
        } else {
            "plain SPDY"
        };

        // 100 MiB from a pod, byte-exact.
        let pf = KubectlPortForward::start(c, &pod, &[80], websockets, "pod");
        let o = sha256_over(pf.ports[0], "/100m.bin");
        assert!(
            o.status.success() && stdout(&o).split_whitespace().next() == Some(want.as_str()),
            "{mode}: 100m.bin through kubectl port-forward {pod}: {}{}\n{}",
            stdout(&o),
            stderr(&o),
            pf.log()
        );
        // kubectl took the path asked for (no fallback).
        assert_eq!(
            pf.log().contains("negotiated protocol: portforward.k8s.io"),
            websockets,
            "{mode}: kubectl's log:\n{}",
            pf.log()
        );
        drop(pf);

        // Four at once through one port-forward to a Service.
        let pf = KubectlPortForward::start(c, "svc/web", &[80], websockets, "svc");
        let port = pf.ports[0];
        let downloads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || sha256_over(port, "/100m.bin")))
            .collect();
        for d in downloads {
            let o = d.join().expect("download thread");
            assert!(
                o.status.success() && stdout(&o).split_whitespace().next() == Some(want.as_str()),
                "{mode}: concurrent 100m.bin through svc/web: {}{}\n{}",
                stdout(&o),
                stderr(&o),
                pf.log()
            );
        }
        // ... and the port-forward still serves the next one.
        let o = sha256_over(port, "/1k.bin");
        assert_eq!(
            stdout(&o).split_whitespace().next(),
            Some(listed_sha256(c, "1k.bin").as_str()),
            "{mode}: after the concurrent ones: {}",
            stderr(&o)
        );
        drop(pf);

        // A port nothing listens on in the pod: the kubelet's message
        // travels on the error stream and kubectl prints it. (kubectl
        // 1.32 then closes its connection and exits, "lost connection to
        // pod", as it does against a real cluster; the server side keeps
        // a session serving after an error, see the apiserver's
        // portforward tests.)
        let mut pf = KubectlPortForward::start(c, &pod, &[81, 80], websockets, "refused");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", pf.ports[0])).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty(), "{mode}: bytes from a refused port: {buf:?}");
        let log = eventually(
            Duration::from_secs(20),
            "kubectl to print the error",
            || {
                let log = pf.log();
                log.contains("error forwarding port 81 to pod")
                    .then_some(log)
            },
        );
        assert!(
            log.contains(&format!(
                "an error occurred forwarding {} -> 81: error forwarding port 81 to pod {web}_default, uid : ",
                pf.ports[0]
            )) && log.contains("dial tcp4 127.0.0.1:81: connect: connection refused"),
            "{mode}: kubectl's report:\n{log}"
        );
        let status = eventually(Duration::from_secs(20), "kubectl to stop", || {
            pf.child.try_wait().expect("try_wait")
        });
        assert!(
            !status.success() && pf.log().contains("lost connection to pod"),
            "{mode}: kubectl {status}:\n{}",
            pf.log()
        );
        drop(pf);

        // A following good connection (a new port-forward, as a user
        // would start) works.
        let pf = KubectlPortForward::start(c, &pod, &[80], websockets, "after");
        let o = sha256_over(pf.ports[0], "/1k.bin");
        assert_eq!(
            stdout(&o).split_whitespace().next(),
            Some(listed_sha256(c, "1k.bin").as_str()),
            "{mode}: after the refused port: {}\n{}",
            stderr(&o),
            pf.log()
        );
    }
}
