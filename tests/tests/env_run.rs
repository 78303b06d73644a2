//! Acceptance of `burrow env` and `burrow run` (issue 16), in one shared
//! miniature cluster with two laptops and the real binaries.
//!
//! Each acceptance point is a test of its own, with its own namespace
//! (`er-*`) and objects, so none depends on another's order
//! (`cargo test --test env_run env_equals_the_real_process`). Laptop 1 is
//! connected (`-n default`) by the first point that runs a command; laptop 2
//! is connected to `er-other` by the short-name point only. The point that
//! checks that `run` connects first takes the cluster alone.
//!
//! What the kubelet adds that does not come from the pod spec, and that
//! `burrow env` therefore does not print: PATH and HOME (the runtime's and
//! the image's defaults). The stand-in kubelet adds no other image default
//! to a container without ports (`PORT` is its image default for
//! containers with ports: none here).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::{Value, json};

/// The binary's cluster, shared with the other points.
fn er() -> Option<SharedCluster> {
    shared_cluster("er", 2)
}

/// Laptop `n`, its burrow's run dir in the cluster's state dir (gone with
/// the cluster).
fn laptop(c: &Cluster, n: usize) -> Laptop<'_> {
    Laptop::new(c, n, c.state_dir().join(format!("burrow-run-er{n}")))
}

static CONNECTING: Mutex<()> = Mutex::new(());

fn is_connected(l: &Laptop) -> Option<Value> {
    let o = run(l.burrow(&["status", "-o", "json"]));
    let st: Value = serde_json::from_str(&stdout(&o)).ok()?;
    (o.status.success() && st["connected"] == true).then_some(st)
}

/// Laptop `n` connected to namespace `ns` (connects when it is not).
fn connected<'a>(c: &'a Cluster, n: usize, ns: &str) -> Laptop<'a> {
    let l = laptop(c, n);
    let _one = CONNECTING.lock().unwrap_or_else(|p| p.into_inner());
    if is_connected(&l).is_none() {
        let out = l.connect_ok(&["-n", ns]);
        eprintln!("laptop {n} connect -n {ns}:\n{out}");
    }
    l
}

fn kc(c: &Cluster) -> String {
    c.kubeconfig().display().to_string()
}

/// `burrow env ARGS --kubeconfig <admin>` in laptop 1.
fn env_cmd(c: &Cluster, args: &[&str]) -> Command {
    let k = kc(c);
    let mut all = vec!["env"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--kubeconfig", &k]);
    laptop(c, 1).burrow(&all)
}

/// `burrow run SEL --kubeconfig <admin> -- CMD` in laptop `n`.
fn run_cmd(c: &Cluster, n: usize, sel: &[&str], cmd: &[&str]) -> Command {
    let k = kc(c);
    let mut all = vec!["run"];
    all.extend_from_slice(sel);
    all.extend_from_slice(&["--kubeconfig", &k, "--"]);
    all.extend_from_slice(cmd);
    laptop(c, n).burrow(&all)
}

/// Asserts success; stdout.
fn ok_out(what: &str, o: &Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// `burrow env ARGS -o json` as a map; also its stderr.
fn env_json(c: &Cluster, args: &[&str]) -> (BTreeMap<String, String>, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    let o = run(env_cmd(c, &all));
    let out = ok_out(&format!("burrow env {all:?}"), &o);
    let map: BTreeMap<String, String> = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("burrow env -o json is not one flat JSON object ({e}):\n{out}"));
    (map, stderr(&o))
}

/// Applies the objects (a stream of JSON documents, as kubectl reads it).
fn apply(c: &Cluster, objs: &[Value]) {
    let docs: Vec<String> = objs.iter().map(Value::to_string).collect();
    kubectl_apply(c, &docs.join("\n"));
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn config_map(ns: &str, name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": data})
}

/// A Secret with `data` (base64): a plain value never appears in the
/// object, not even in kubectl's last-applied annotation.
fn secret(ns: &str, name: &str, data: Value) -> Value {
    use base64::Engine;
    let encoded: serde_json::Map<String, Value> = data
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let v = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
            (k.clone(), json!(v))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "data": encoded})
}

/// The `pod` field of an echo answer (None when it is not one).
fn echo_pod_of(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    v["pod"].as_str().map(str::to_string)
}

fn service(ns: &str, name: &str, selector: Value, ports: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "ports": ports}})
}

/// A Deployment `name` (label `app: name`, one replica) of `pod_spec`.
fn deployment(ns: &str, name: &str, template_meta: Value, pod_spec: Value) -> Value {
    let mut meta = template_meta;
    meta["labels"]["app"] = json!(name);
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": meta, "spec": pod_spec}}})
}

fn sleeper(name: &str) -> Value {
    json!({"name": name, "image": "busybox", "command": ["sleep", "infinity"]})
}

/// The running, ready pod of Deployment `app` in `ns` (waits for it).
fn ready_pod(c: &Cluster, ns: &str, app: &str) -> Value {
    eventually(
        Duration::from_secs(60),
        &format!("a ready pod of {ns}/{app}"),
        || {
            let o = run(kubectl(
                c,
                &[
                    "get",
                    "pods",
                    "-n",
                    ns,
                    "-l",
                    &format!("app={app}"),
                    "-o",
                    "json",
                ],
            ));
            let list: Value = serde_json::from_str(&stdout(&o)).ok()?;
            let ready: Vec<Value> = list["items"]
                .as_array()?
                .iter()
                .filter(|p| {
                    p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["phase"] == "Running"
                        && p["status"]["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .cloned()
                .collect();
            (ready.len() == 1).then(|| ready[0].clone())
        },
    )
}

fn pod_json(c: &Cluster, ns: &str, name: &str) -> Value {
    let out = ok(kubectl(c, &["get", "pod", name, "-n", ns, "-o", "json"]));
    serde_json::from_str(&out).expect("pod json")
}

/// The pid of `container` of `pod` (`containerID` `mc://<pid>`).
fn container_pid(pod: &Value, container: &str) -> u32 {
    let st = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == container)
        .unwrap_or_else(|| panic!("no status of container {container}: {pod}"));
    let id = st["containerID"].as_str().unwrap_or("");
    id.strip_prefix("mc://")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("containerID {id:?} is not mc://<pid>"))
}

/// The environment of a process, from `/proc/<pid>/environ`.
fn proc_environ(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/environ: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// What the container's real process has, minus what the runtime and the
/// image add (PATH, HOME).
fn real_env(c: &Cluster, ns: &str, pod: &str, container: &str) -> BTreeMap<String, String> {
    let p = pod_json(c, ns, pod);
    let mut env = proc_environ(container_pid(&p, container));
    for k in ["PATH", "HOME"] {
        env.remove(k);
    }
    env
}

/// Asserts two environments are equal, listing the differences.
fn assert_same_env(what: &str, got: &BTreeMap<String, String>, want: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {k}={v:?}")),
            Some(g) if g != v => diffs.push(format!("{k}: burrow {g:?}, process {v:?}")),
            _ => {}
        }
    }
    for (k, v) in got {
        if !want.contains_key(k) {
            diffs.push(format!("extra {k}={v:?} (the process has no {k})"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: burrow env differs from the process's environment:\n{}",
        diffs.join("\n")
    );
}

/// A value no file should contain, unique to this run.
fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}-{}-{nanos:x}", std::process::id())
}

/// Waits for `child` to exit (a deadline for a hang); its exit code, or
/// 128+N for a signal.
fn wait_exit(child: &mut Child, what: &str) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    let st = eventually(Duration::from_secs(60), what, || {
        child.try_wait().expect("try_wait")
    });
    st.code().or(st.signal().map(|s| 128 + s)).unwrap_or(-1)
}

/// Starts a command with its output captured in files (read with
/// [`read_out`]).
fn spawn_logged(mut cmd: Command, dir: &Path, tag: &str) -> Child {
    let out = std::fs::File::create(dir.join(format!("{tag}.out"))).expect("out file");
    let err = std::fs::File::create(dir.join(format!("{tag}.err"))).expect("err file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn")
}

fn read_out(dir: &Path, tag: &str) -> (String, String) {
    let r =
        |ext: &str| std::fs::read_to_string(dir.join(format!("{tag}.{ext}"))).unwrap_or_default();
    (r("out"), r("err"))
}

/// A scratch dir on the host (the laptops share its filesystem), readable
/// by everyone (CMD may run as nobody).
fn scratch() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    d
}

// ---------------------------------------------------------------------------
// 1. burrow env equals the real process's environment

const ENV_NS: &str = "er-env";

/// The env workloads: every env source, in `er-env`.
fn env_objects() -> Vec<Value> {
    let ns = ENV_NS;
    let main = json!({
        "name": "main", "image": "busybox", "command": ["sleep", "infinity"],
        "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}},
        "envFrom": [
            {"configMapRef": {"name": "cfg"}},
            {"configMapRef": {"name": "cfg2"}},
            {"secretRef": {"name": "sec"}, "prefix": "S_"},
            {"configMapRef": {"name": "absent", "optional": true}},
            {"secretRef": {"name": "absent-secret", "optional": true}, "prefix": "X_"}
        ],
        "env": [
            {"name": "PLAIN", "value": "x-$(GREETING)-$$(GREETING)-$(NOPE)-$(REDIS_MAIN_SERVICE_HOST)-$(LATER)-$$-$"},
            {"name": "MODE", "value": "slow"},
            {"name": "EMPTY", "value": ""},
            {"name": "SHARED_SEEN", "value": "[$(SHARED)]"},
            {"name": "CM_KEY", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "GREETING"}}},
            {"name": "CM_OPT_KEY", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": true}}},
            {"name": "CM_OPT", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": true}}},
            {"name": "SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
            {"name": "SECRET_OPT", "valueFrom": {"secretKeyRef": {"name": "absent-secret", "key": "k", "optional": true}}},
            {"name": "SECRET_OPT_KEY", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nope", "optional": true}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "APP_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TIER_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
            {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['team']"}}},
            {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['example.com/note']"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "CPU_LIMIT_M", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "CPU_REQUEST_M", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
            {"name": "MEM_LIMIT_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "MEM_REQUEST", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory"}}},
            {"name": "EPHEMERAL_LIMIT_GI", "valueFrom": {"resourceFieldRef": {"resource": "limits.ephemeral-storage", "divisor": "1Gi"}}},
            {"name": "EPHEMERAL_REQUEST", "valueFrom": {"resourceFieldRef": {"resource": "requests.ephemeral-storage"}}},
            {"name": "SIDE_CPU_LIMIT_M", "valueFrom": {"resourceFieldRef": {"containerName": "side", "resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "LATER", "value": "later"},
            {"name": "REDIS_MAIN_SERVICE_PORT", "value": "overridden"}
        ]
    });
    let side = json!({
        "name": "side", "image": "busybox", "command": ["sleep", "infinity"],
        "env": [
            {"name": "SIDE", "value": "yes"},
            {"name": "SIDE_MEM_LIMIT_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "MAIN_CPU_REQUEST_M", "valueFrom": {"resourceFieldRef": {"containerName": "main", "resource": "requests.cpu", "divisor": "1m"}}}
        ]
    });
    let init = json!({"name": "init", "image": "busybox", "command": ["true"], "env": [{"name": "INIT_ONLY", "value": "1"}]});
    vec![
        namespace(ns),
        config_map(
            ns,
            "cfg",
            json!({"GREETING": "hello", "MODE": "fast", "SHARED": "from-cfg", "ONLY_CFG": "1"}),
        ),
        config_map(
            ns,
            "cfg2",
            json!({"SHARED": "from-cfg2", "EXTRA": "extra value"}),
        ),
        secret(
            ns,
            "sec",
            json!({"TOKEN": "s3cr3t-token", "PASSWORD": "p@ss w0rd$"}),
        ),
        service(
            ns,
            "redis-main",
            json!({"app": "nothing"}),
            json!([
            {"name": "redis", "port": 6379, "targetPort": 6379},
            {"name": "metrics", "port": 9121, "targetPort": 9121}]),
        ),
        service(
            ns,
            "dns-svc",
            json!({"app": "nothing"}),
            json!([
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]),
        ),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "headless", "namespace": ns},
            "spec": {"clusterIP": "None", "selector": {"app": "nothing"}, "ports": [{"port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "outside", "namespace": ns},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}),
        deployment(
            ns,
            "envy",
            json!({"labels": {"tier": "back-end"},
                "annotations": {"team": "core platform", "example.com/note": "say \"hi\" to $HOME"}}),
            json!({"initContainers": [init], "containers": [main, side]}),
        ),
        deployment(
            ns,
            "nolinks",
            json!({}),
            json!({"enableServiceLinks": false, "containers": [{
                "name": "only", "image": "busybox", "command": ["sleep", "infinity"],
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "$(REDIS_MAIN_SERVICE_HOST)"}]}]}),
        ),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fqdn", "namespace": ns, "labels": {"app": "fqdn"}},
            "spec": {"hostname": "web-1", "subdomain": "grp", "setHostnameAsFQDN": true, "containers": [{
                "name": "c", "image": "busybox", "command": ["sleep", "infinity"]}]}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "named", "namespace": ns, "labels": {"app": "named"}},
            "spec": {"hostname": "custom-host", "containers": [{
                "name": "c", "image": "busybox", "command": ["sleep", "infinity"],
                "env": [{"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}}),
    ]
}

static ENV_SETUP: Mutex<bool> = Mutex::new(false);

/// The env workloads, applied once (Services first: service links are
/// taken when a container starts).
fn env_setup(c: &Cluster) {
    let mut done = ENV_SETUP.lock().unwrap_or_else(|p| p.into_inner());
    if !*done {
        let objs = env_objects();
        let (first, workloads): (Vec<Value>, Vec<Value>) = objs
            .into_iter()
            .partition(|o| !matches!(o["kind"].as_str(), Some("Deployment" | "Pod")));
        apply(c, &first);
        apply(c, &workloads);
        *done = true;
    }
}

#[test]
fn env_equals_the_real_process() {
    let Some(c) = er() else { return };
    env_setup(&c);
    let pod = ready_pod(&c, ENV_NS, "envy");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let want = real_env(&c, ENV_NS, &name, "main");
    // The stand-in built what the kubelet would (a wrong test world would
    // make this point meaningless).
    assert_eq!(
        want.get("PLAIN").map(String::as_str),
        Some(
            format!(
                "x-hello-$(GREETING)-$(NOPE)-{}-$(LATER)-$-$",
                want["REDIS_MAIN_SERVICE_HOST"]
            )
            .as_str()
        )
    );
    assert_eq!(want["SHARED"], "from-cfg2");
    assert_eq!(want["CPU_LIMIT_M"], "500");
    assert_eq!(want["MEM_REQUEST"], "67108864");
    assert_eq!(want["EPHEMERAL_LIMIT_GI"], "20");
    assert_eq!(want["SIDE_CPU_LIMIT_M"], "2000");
    assert_eq!(want["HOSTNAME"], name);
    assert!(!want.contains_key("INIT_ONLY"));

    let (got, err) = env_json(&c, &["deploy/envy", "-n", ENV_NS]);
    assert_same_env("deploy/envy", &got, &want);
    assert!(
        err.contains(&name),
        "burrow env must name the pod whose fields it used ({name}) on stderr: {err}"
    );
    for sel in ["deployment/envy", "deployments/envy", "envy"] {
        let (got, _) = env_json(&c, &[sel, "-n", ENV_NS]);
        assert_same_env(sel, &got, &want);
    }
    let pod_sel = format!("pod/{name}");
    let (got, _) = env_json(&c, &[&pod_sel, "-n", ENV_NS, "-c", "main"]);
    assert_same_env(&pod_sel, &got, &want);
}

#[test]
fn env_of_a_second_container() {
    let Some(c) = er() else { return };
    env_setup(&c);
    let pod = ready_pod(&c, ENV_NS, "envy");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let want = real_env(&c, ENV_NS, &name, "side");
    assert_eq!(want["SIDE_MEM_LIMIT_MI"], "4096");
    assert_eq!(want["MAIN_CPU_REQUEST_M"], "250");
    let (got, _) = env_json(&c, &["deploy/envy", "-n", ENV_NS, "-c", "side"]);
    assert_same_env("-c side", &got, &want);
}

#[test]
fn env_without_service_links_and_of_a_pod_with_a_hostname() {
    let Some(c) = er() else { return };
    env_setup(&c);
    let pod = ready_pod(&c, ENV_NS, "nolinks");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let want = real_env(&c, ENV_NS, &name, "only");
    assert!(want.contains_key("KUBERNETES_SERVICE_HOST"));
    assert!(!want.contains_key("REDIS_MAIN_SERVICE_HOST"));
    assert_eq!(want["B"], "$(REDIS_MAIN_SERVICE_HOST)");
    let (got, _) = env_json(&c, &["deploy/nolinks", "-n", ENV_NS]);
    assert_same_env("enableServiceLinks: false", &got, &want);

    wait_pod_ready(&c, ENV_NS, "named");
    let want = real_env(&c, ENV_NS, "named", "c");
    assert_eq!(want["HOSTNAME"], "custom-host");
    let (got, err) = env_json(&c, &["po/named", "-n", ENV_NS]);
    assert_same_env("po/named", &got, &want);
    assert!(err.contains("named"), "{err}");
    let (got, _) = env_json(&c, &["named", "-n", ENV_NS]);
    assert_same_env("bare name of a pod", &got, &want);
}

#[test]
fn env_of_a_pod_with_set_hostname_as_fqdn() {
    let Some(c) = er() else { return };
    env_setup(&c);
    wait_pod_ready(&c, ENV_NS, "fqdn");
    let want = real_env(&c, ENV_NS, "fqdn", "c");
    assert_eq!(want["HOSTNAME"], "web-1.grp.er-env.svc.cluster.local");
    let (got, _) = env_json(&c, &["pod/fqdn", "-n", ENV_NS]);
    assert_same_env("setHostnameAsFQDN", &got, &want);
}

#[test]
fn env_of_a_statefulset_and_a_daemonset() {
    let Some(c) = er() else { return };
    let ns = "er-apps";
    let container = json!({"name": "c", "image": "busybox", "command": ["sleep", "infinity"],
    "env": [
        {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}},
        {"name": "GREETING", "value": "hi $(DB_SERVICE_HOST)"}
    ]});
    let template = |app: &str| json!({"metadata": {"labels": {"app": app}}, "spec": {"containers": [container.clone()]}});
    apply(
        &c,
        &[
            namespace(ns),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": ns},
                "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}}),
            service(
                ns,
                "front",
                json!({"app": "agent"}),
                json!([{"port": 80, "targetPort": 80}]),
            ),
        ],
    );
    apply(
        &c,
        &[
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": ns},
                "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": template("db")}}),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": ns},
                "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template("agent")}}),
        ],
    );
    ready_pod(&c, ns, "db");
    let want = real_env(&c, ns, "db-0", "c");
    assert_eq!(want["HOSTNAME"], "db-0");
    assert_eq!(want["INDEX"], "0");
    assert!(want.contains_key("FRONT_SERVICE_HOST"));
    for sel in ["statefulset/db", "sts/db", "statefulsets/db"] {
        let (got, err) = env_json(&c, &[sel, "-n", ns]);
        assert_same_env(sel, &got, &want);
        assert!(
            err.contains("db-0"),
            "{sel}: the pod is named on stderr: {err}"
        );
    }
    let pod = ready_pod(&c, ns, "agent");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let want = real_env(&c, ns, &name, "c");
    for sel in ["daemonset/agent", "ds/agent", "daemonsets/agent"] {
        let (got, err) = env_json(&c, &[sel, "-n", ns]);
        assert_same_env(sel, &got, &want);
        assert!(
            err.contains(&name),
            "{sel}: the pod is named on stderr: {err}"
        );
    }
}

/// Values a shell or an env file gets wrong when quoted carelessly.
fn nasty_values() -> Value {
    json!({
        "SPACES": "two  words  ",
        "LEADING": "  lead",
        "SQUOTE": "it's",
        "DQUOTE": "say \"hi\"",
        "DOLLAR": "$HOME $(X) ${Y} $ $$",
        "BACKSLASH": "back\\slash \\\\ \\n \\",
        "NEWLINES": "line1\nline2\n\nend\n",
        "EQUALS": "a=b=c",
        "UNICODE": "ünïcödé ✓ 日本語",
        "EMPTY": "",
        "BACKTICK": "`id` $(id)",
        "BANG": "!! !$",
        "HASH": "# not a comment",
        "TAB": "a\tb",
        "CR": "a\rb",
        "SEMI": "a; echo pwned",
        "GLOB": "* ? [a-z]"
    })
}

#[test]
fn dotenv_and_shell_output_round_trip_through_bash() {
    let Some(c) = er() else { return };
    let ns = "er-dotenv";
    apply(
        &c,
        &[namespace(ns), config_map(ns, "nasty", nasty_values())],
    );
    apply(
        &c,
        &[deployment(
            ns,
            "nasty",
            json!({}),
            json!({"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "infinity"],
                "envFrom": [{"configMapRef": {"name": "nasty"}}],
                "env": [{"name": "EXPANDED", "value": "<$(DQUOTE)> $$(SQUOTE)"}]}]}),
        )],
    );
    ready_pod(&c, ns, "nasty");
    let (want, _) = env_json(&c, &["deploy/nasty", "-n", ns]);
    for (k, v) in nasty_values().as_object().expect("object") {
        assert_eq!(
            want.get(k).map(String::as_str),
            v.as_str(),
            "{k} in -o json"
        );
    }
    assert_eq!(want["EXPANDED"], "<say \"hi\"> $(SQUOTE)");
    let burrow = bin_dir().join("burrow").display().to_string();
    let l = laptop(&c, 1);
    let run_dir = l.run_dir().display().to_string();
    let k = kc(&c);
    let base = format!("{burrow} --run-dir {run_dir} env deploy/nasty -n {ns} --kubeconfig {k}");
    for (name, script) in [
        (
            "dotenv with set -a",
            format!("set -a; . <({base}); set +a; env -0"),
        ),
        (
            "dotenv (-o dotenv) with set -a",
            format!("set -a; . <({base} -o dotenv); set +a; env -0"),
        ),
        ("-o shell", format!(". <({base} -o shell); env -0")),
    ] {
        let out = l.ok(&["env", "-i", "/bin/bash", "-c", &script]);
        let got: BTreeMap<String, String> = out
            .split('\0')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &want {
            assert_eq!(
                got.get(k),
                Some(v),
                "{name}: {k} read back by bash differs from -o json"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2. burrow run: volumes at their mountPaths, nothing on the laptop

/// Prints, for each file, `stat -L -c '%a %U %n'` and its content.
const VOLUME_FILES: &[&str] = &[
    "/etc/er-vol/conf/sub/dir/app.conf",
    "/etc/er-vol/single.conf",
    "/etc/er-vol/creds/password",
    "/etc/er-vol/info/labels",
    "/etc/er-vol/info/annotations",
    "/etc/er-vol/info/name",
    "/etc/er-vol/proj/other.txt",
    "/etc/er-vol/proj/pw",
    "/etc/er-vol/proj/namespace",
];

fn volume_script() -> String {
    let files = VOLUME_FILES.join(" ");
    format!(
        "echo BEGIN-FILES; for f in {files}; do stat -L -c '%a %U %n' \"$f\" || echo \"missing $f\"; cat \"$f\"; echo; echo ---; done; echo END-FILES"
    )
}

/// The part of `out` the volume script printed.
fn files_section(out: &str) -> String {
    let start = out
        .find("BEGIN-FILES\n")
        .map(|i| i + "BEGIN-FILES\n".len())
        .unwrap_or_else(|| panic!("no BEGIN-FILES in:\n{out}"));
    let end = out[start..]
        .find("END-FILES")
        .map(|i| start + i)
        .unwrap_or_else(|| panic!("no END-FILES in:\n{out}"));
    out[start..end].to_string()
}

fn volume_objects(ns: &str, app: &str, secret_value: &str, command: Value) -> Vec<Value> {
    vec![
        namespace(ns),
        config_map(
            ns,
            "files",
            json!({"app.conf": "key=value\nother = 2\n", "other.txt": "other file"}),
        ),
        secret(ns, "creds", json!({"password": secret_value})),
        deployment(
            ns,
            app,
            json!({"labels": {"tier": "files"},
                "annotations": {"note": "say \"hi\"\n\tünï ✓ \\", "a": "1"}}),
            json!({
                "volumes": [
                    {"name": "conf", "configMap": {"name": "files", "items": [{"key": "app.conf", "path": "sub/dir/app.conf"}]}},
                    {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
                    {"name": "info", "downwardAPI": {"items": [
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    {"name": "proj", "projected": {"defaultMode": 0o444, "sources": [
                        {"configMap": {"name": "files", "items": [{"key": "other.txt", "path": "other.txt"}]}},
                        {"secret": {"name": "creds", "items": [{"key": "password", "path": "pw", "mode": 0o440}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}
                ],
                "containers": [{
                    "name": "c", "image": "busybox", "command": command,
                    "volumeMounts": [
                        {"name": "conf", "mountPath": "/etc/er-vol/conf"},
                        {"name": "conf", "mountPath": "/etc/er-vol/single.conf", "subPath": "sub/dir/app.conf"},
                        {"name": "creds", "mountPath": "/etc/er-vol/creds", "readOnly": true},
                        {"name": "info", "mountPath": "/etc/er-vol/info"},
                        {"name": "proj", "mountPath": "/etc/er-vol/proj"}
                    ]
                }]
            }),
        ),
    ]
}

/// Files on the host (so on every laptop) under the temporary and runtime
/// directories that contain `needle`, but the cluster node's own copies
/// (the kubelet's volumes and logs of the pods) and the test's own
/// captures of CMD's output (`mine`).
fn files_containing(c: &Cluster, needle: &str, mine: &Path) -> Vec<String> {
    let o = run({
        let mut cmd = Command::new("grep");
        cmd.args([
            "-rlsF", "--", needle, "/tmp", "/run", "/dev/shm", "/var/tmp",
        ]);
        cmd
    });
    let node_pods = c.state_dir().join("pods").display().to_string();
    stdout(&o)
        .lines()
        .filter(|p| !p.starts_with(&node_pods) && !Path::new(p).starts_with(mine))
        .map(str::to_string)
        .collect()
}

fn assert_no_mount_paths(c: &Cluster, when: &str) {
    let o = run(laptop(c, 1).on(&["test", "-e", "/etc/er-vol"]));
    assert!(
        !o.status.success(),
        "{when}: /etc/er-vol exists on the laptop"
    );
}

#[test]
fn run_sees_the_volumes_and_leaves_nothing() {
    let Some(c) = er() else { return };
    let ns = "er-vol";
    let secret_value = unique("er-secret-value");
    let script = volume_script();
    // The pod prints what it sees, then sleeps: its log is the cluster's
    // view to compare with.
    let in_pod = json!(["sh", "-c", format!("{script}; exec sleep infinity")]);
    assert_no_mount_paths(&c, "before");
    apply(&c, &volume_objects(ns, "vols", &secret_value, in_pod));
    let pod = ready_pod(&c, ns, "vols");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let cluster_view = files_section(&logs_containing(&c, &[&name, "-n", ns], "END-FILES"));
    assert!(
        cluster_view.contains("400 root /etc/er-vol/creds/password")
            && cluster_view.contains(&secret_value),
        "the pod's own view: {cluster_view}"
    );
    let _l = connected(&c, 1, "default");
    let dir = scratch();
    let before = files_containing(&c, &secret_value, dir.path());
    assert!(
        before.is_empty(),
        "the secret is in files before burrow run: {before:?}"
    );

    // While CMD runs: nothing on the laptop's own filesystem.
    let ready = dir.path().join("ready");
    let go = dir.path().join("go");
    let cmd_script = format!(
        "{script}; echo started > {r}; while [ ! -e {g} ]; do sleep 0.1; done",
        r = ready.display(),
        g = go.display()
    );
    let mut child = spawn_logged(
        run_cmd(
            &c,
            1,
            &["deploy/vols", "-n", ns],
            &["sh", "-c", &cmd_script],
        ),
        dir.path(),
        "run",
    );
    eventually(Duration::from_secs(60), "burrow run's CMD started", || {
        if let Ok(Some(st)) = child.try_wait() {
            let (out, err) = read_out(dir.path(), "run");
            panic!("burrow run exited early ({st}):\nstdout: {out}\nstderr: {err}");
        }
        ready.exists().then_some(())
    });
    assert_no_mount_paths(&c, "while CMD runs");
    let during = files_containing(&c, &secret_value, dir.path());
    std::fs::write(&go, "").expect("go");
    let code = wait_exit(&mut child, "burrow run to end");
    let (out, err) = read_out(dir.path(), "run");
    assert_eq!(code, 0, "burrow run failed:\nstdout: {out}\nstderr: {err}");
    assert!(
        during.is_empty(),
        "while CMD ran, files on the laptop held the Secret's value: {during:?}"
    );
    let out = files_section(&out);
    assert_eq!(
        out, cluster_view,
        "burrow run's CMD sees other files (stat -L '%a %U %n' and contents) than the pod:\n--- run:\n{out}\n--- pod:\n{cluster_view}"
    );
    for want in [
        "644 root /etc/er-vol/conf/sub/dir/app.conf\nkey=value\nother = 2\n",
        "644 root /etc/er-vol/single.conf\nkey=value",
        &format!("400 root /etc/er-vol/creds/password\n{secret_value}\n"),
        "644 root /etc/er-vol/info/labels\napp=\"vols\"",
        "644 root /etc/er-vol/info/annotations\na=\"1\"\nnote=\"say \\\"hi\\\"\\n\\tünï ✓ \\\\\"\n",
        &format!("644 root /etc/er-vol/info/name\n{name}\n"),
        "444 root /etc/er-vol/proj/other.txt\nother file\n",
        &format!("440 root /etc/er-vol/proj/pw\n{secret_value}\n"),
        &format!("444 root /etc/er-vol/proj/namespace\n{ns}\n"),
    ] {
        assert!(out.contains(want), "CMD's view lacks {want:?}:\n{out}");
    }
    assert_no_mount_paths(&c, "after");
    let after = files_containing(&c, &secret_value, dir.path());
    assert!(
        after.is_empty(),
        "after burrow run, files on the laptop hold the Secret's value: {after:?}"
    );
}

#[test]
fn env_files_dir_writes_the_volumes_there() {
    let Some(c) = er() else { return };
    let ns = "er-files";
    let secret_value = unique("er-files-secret");
    apply(
        &c,
        &volume_objects(ns, "vols", &secret_value, json!(["sleep", "infinity"])),
    );
    let pod = ready_pod(&c, ns, "vols");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let dir = scratch();
    let files = dir.path().join("files");
    let files_arg = files.display().to_string();
    let o = run(env_cmd(
        &c,
        &[
            "deploy/vols",
            "-n",
            ns,
            "--files-dir",
            &files_arg,
            "-o",
            "json",
        ],
    ));
    let out = ok_out("burrow env --files-dir", &o);
    let _: BTreeMap<String, String> =
        serde_json::from_str(&out).expect("stdout is still the JSON object");
    let err = stderr(&o);
    for mount in [
        "/etc/er-vol/conf",
        "/etc/er-vol/creds",
        "/etc/er-vol/info",
        "/etc/er-vol/proj",
    ] {
        let at = files.join(mount.trim_start_matches('/'));
        assert!(
            err.contains(mount) && err.contains(&at.display().to_string()),
            "stderr must name {mount} and where it was written ({}): {err}",
            at.display()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let file = |rel: &str| {
        let p = files.join(rel);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        (text, mode)
    };
    assert_eq!(
        file("etc/er-vol/conf/sub/dir/app.conf").0,
        "key=value\nother = 2\n"
    );
    assert_eq!(
        file("etc/er-vol/creds/password"),
        (secret_value.clone(), 0o600)
    );
    assert_eq!(file("etc/er-vol/info/name").0, name);
    assert_eq!(file("etc/er-vol/proj/namespace").0, ns);
    assert_eq!(file("etc/er-vol/proj/pw").0, secret_value);
    assert_no_mount_paths(&c, "after env --files-dir");
    // A subPath mount is that one file of the volume, as in the pod.
    let single = files.join("etc/er-vol/single.conf");
    assert!(
        single.is_file(),
        "{} (a subPath mount of sub/dir/app.conf) must be the file, not {}",
        single.display(),
        if single.is_dir() {
            "a directory"
        } else {
            "missing"
        }
    );
    assert_eq!(file("etc/er-vol/single.conf").0, "key=value\nother = 2\n");
}

#[test]
fn run_files_follow_the_pods_fs_group() {
    let Some(c) = er() else { return };
    let ns = "er-fsgroup";
    let secret_value = unique("er-fsgroup-secret");
    let script = volume_script().replace("'%a %U %n'", "'%a %n'");
    let mut objs = volume_objects(
        ns,
        "grouped",
        &secret_value,
        json!(["sh", "-c", format!("{script}; exec sleep infinity")]),
    );
    objs[3]["spec"]["template"]["spec"]["securityContext"] = json!({"fsGroup": 2000});
    apply(&c, &objs);
    let pod = ready_pod(&c, ns, "grouped");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let cluster_view = files_section(&logs_containing(&c, &[&name, "-n", ns], "END-FILES"));
    assert!(
        cluster_view.contains("440 /etc/er-vol/creds/password"),
        "fsGroup adds group read: {cluster_view}"
    );
    let _l = connected(&c, 1, "default");
    let o = run(run_cmd(
        &c,
        1,
        &["deploy/grouped", "-n", ns],
        &["sh", "-c", &script],
    ));
    let out = files_section(&ok_out("burrow run (fsGroup)", &o));
    assert_eq!(
        out, cluster_view,
        "with fsGroup, CMD sees other modes or contents than the pod:\n--- run:\n{out}\n--- pod:\n{cluster_view}"
    );
}

// ---------------------------------------------------------------------------
// 3. a short name is a Service of the workload's namespace

#[test]
fn run_resolves_short_names_in_the_workloads_namespace() {
    let Some(c) = er() else { return };
    let echo = |ns: &str, answer: &str| {
        vec![
            namespace(ns),
            deployment(
                ns,
                "whoami",
                json!({}),
                json!({"containers": [{"name": "echo", "image": "burrow/echo",
                    "ports": [{"containerPort": 8080}],
                    "env": [{"name": "POD_NAME", "value": answer}]}]}),
            ),
            service(
                ns,
                "whoami",
                json!({"app": "whoami"}),
                json!([{"name": "http", "port": 8080, "targetPort": 8080}]),
            ),
        ]
    };
    apply(&c, &echo("er-dns", "whoami-of-er-dns"));
    apply(&c, &echo("er-other", "whoami-of-er-other"));
    apply(
        &c,
        &[deployment(
            "er-dns",
            "app",
            json!({}),
            json!({"containers": [sleeper("c")]}),
        )],
    );
    ready_pod(&c, "er-dns", "whoami");
    ready_pod(&c, "er-other", "whoami");
    ready_pod(&c, "er-dns", "app");
    // kube-proxy follows a new Service within its sync period: wait until
    // a pod reaches it.
    for ns in ["er-dns", "er-other"] {
        let url = format!("http://whoami.{ns}:8080/");
        eventually(
            Duration::from_secs(30),
            &format!("{url} from the caller pod"),
            || {
                let o = run(in_caller(&c, &["curl", "-sS", "--max-time", "5", &url]));
                (echo_pod_of(&stdout(&o)) == Some(format!("whoami-of-{ns}"))).then_some(())
            },
        );
    }
    // Laptop 2 is connected to another namespace, where `whoami` is
    // another Service.
    let l2 = connected(&c, 2, "er-other");
    let st = is_connected(&l2).expect("laptop 2 connected");
    assert_eq!(st["namespace"], "er-other", "laptop 2's connection: {st}");
    let url = "http://whoami:8080/";
    let outside = eventually(Duration::from_secs(30), "whoami from laptop 2", || {
        let o = run(l2.on(&["curl", "-sS", "--max-time", "5", url]));
        o.status
            .success()
            .then(|| echo_pod_of(&stdout(&o)))
            .flatten()
    });
    assert_eq!(outside, "whoami-of-er-other");
    let o = run(run_cmd(
        &c,
        2,
        &["deploy/app", "-n", "er-dns"],
        &["sh", "-c", &format!("curl -sS --max-time 10 {url}")],
    ));
    let out = ok_out(
        "burrow run deploy/app -n er-dns -- curl http://whoami:8080/",
        &o,
    );
    assert_eq!(
        echo_pod_of(&out).as_deref(),
        Some("whoami-of-er-dns"),
        "{out}"
    );
    let o = run(run_cmd(
        &c,
        2,
        &["deploy/app", "-n", "er-dns"],
        &["cat", "/etc/resolv.conf"],
    ));
    let resolv = ok_out("burrow run -- cat /etc/resolv.conf", &o);
    let search = resolv
        .lines()
        .find(|l| l.starts_with("search"))
        .unwrap_or_else(|| panic!("no search line in CMD's resolv.conf:\n{resolv}"));
    assert!(
        search
            .split_whitespace()
            .nth(1)
            .is_some_and(|first| first == "er-dns.svc.cluster.local"),
        "CMD's search list must start with the workload's namespace: {search}"
    );
}

// ---------------------------------------------------------------------------
// 4. exit codes, signals, the invoking user

fn signals_setup(c: &Cluster, ns: &str, secret_value: &str) {
    apply(
        c,
        &volume_objects(ns, "sig", secret_value, json!(["sleep", "infinity"])),
    );
    ready_pod(c, ns, "sig");
}

#[test]
fn run_passes_exit_codes_through() {
    let Some(c) = er() else { return };
    let ns = "er-exit";
    apply(
        &c,
        &[
            namespace(ns),
            deployment(ns, "x", json!({}), json!({"containers": [sleeper("c")]})),
        ],
    );
    ready_pod(&c, ns, "x");
    let _l = connected(&c, 1, "default");
    for (script, want) in [
        ("exit 0", 0),
        ("exit 3", 3),
        ("exit 255", 255),
        ("kill -TERM $$", 128 + 15),
        ("kill -KILL $$", 128 + 9),
    ] {
        let o = run(run_cmd(
            &c,
            1,
            &["deploy/x", "-n", ns],
            &["sh", "-c", script],
        ));
        let code = {
            use std::os::unix::process::ExitStatusExt;
            o.status
                .code()
                .or(o.status.signal().map(|s| 128 + s))
                .unwrap_or(-1)
        };
        assert_eq!(
            code,
            want,
            "burrow run -- sh -c {script:?}: stderr: {}",
            stderr(&o)
        );
    }
    // The workload's environment, merged over burrow's own.
    let o = run(run_cmd(
        &c,
        1,
        &["deploy/x", "-n", ns],
        &[
            "sh",
            "-c",
            "echo \"$KUBERNETES_SERVICE_HOST $HOSTNAME\"; test -n \"$PATH\"",
        ],
    ));
    let out = ok_out("burrow run -- echo env", &o);
    let pod = ready_pod(&c, ns, "x");
    assert_eq!(
        out.trim(),
        format!(
            "10.96.0.1 {}",
            pod["metadata"]["name"].as_str().unwrap_or("")
        ),
    );
}

#[test]
fn run_forwards_sigterm_and_sigint() {
    let Some(c) = er() else { return };
    let ns = "er-sig";
    signals_setup(&c, ns, &unique("er-sig-secret"));
    let _l = connected(&c, 1, "default");
    for (sig, name, code) in [
        (nix::sys::signal::Signal::SIGTERM, "TERM", 7),
        (nix::sys::signal::Signal::SIGINT, "INT", 5),
    ] {
        let dir = scratch();
        let ready = dir.path().join("ready");
        let got = dir.path().join("got");
        let script = format!(
            "trap 'echo {name} > {got}; exit {code}' {name}; echo up > {ready}; while :; do sleep 0.1; done",
            got = got.display(),
            ready = ready.display()
        );
        let mut child = spawn_logged(
            run_cmd(&c, 1, &["deploy/sig", "-n", ns], &["sh", "-c", &script]),
            dir.path(),
            "run",
        );
        eventually(Duration::from_secs(60), "CMD up", || {
            if let Ok(Some(st)) = child.try_wait() {
                let (out, err) = read_out(dir.path(), "run");
                panic!("burrow run exited early ({st}):\nstdout: {out}\nstderr: {err}");
            }
            ready.exists().then_some(())
        });
        // `ip netns exec` execs burrow: the child is burrow itself.
        let comm =
            std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
        assert_eq!(comm.trim(), "burrow", "the spawned process is not burrow");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
            .expect("signal burrow run");
        let exit = wait_exit(&mut child, "burrow run to end after the signal");
        let (out, err) = read_out(dir.path(), "run");
        assert_eq!(
            std::fs::read_to_string(&got).unwrap_or_default().trim(),
            name,
            "CMD's trap did not see SIG{name}:\nstdout: {out}\nstderr: {err}"
        );
        assert_eq!(exit, code, "exit code after SIG{name}: stderr: {err}");
    }
}

#[test]
fn run_under_sudo_runs_as_the_invoking_user() {
    let Some(c) = er() else { return };
    let ns = "er-sudo";
    let secret_value = unique("er-sudo-secret");
    signals_setup(&c, ns, &secret_value);
    let _l = connected(&c, 1, "default");
    let k = kc(&c);
    let o = run(laptop(&c, 1).burrow(&[
        "run",
        "deploy/sig",
        "-n",
        ns,
        "--kubeconfig",
        &k,
        "--",
        "env",
    ]));
    let plain = ok_out("burrow run -- env", &o);
    assert!(plain.contains("KUBERNETES_SERVICE_HOST="), "{plain}");
    // As sudo sets them: burrow runs as root, CMD as the user.
    let burrow = bin_dir().join("burrow").display().to_string();
    let run_dir = laptop(&c, 1).run_dir().display().to_string();
    let o = run(laptop(&c, 1).on(&[
        "env",
        "SUDO_UID=65534",
        "SUDO_GID=65534",
        "SUDO_USER=nobody",
        "SUDO_COMMAND=/bin/sh",
        &burrow,
        "--run-dir",
        &run_dir,
        "run",
        "deploy/sig",
        "-n",
        ns,
        "--kubeconfig",
        &k,
        "--",
        "sh",
        "-c",
        "id -u; id -g; cat /etc/er-vol/creds/password; echo; stat -L -c '%a %u' /etc/er-vol/creds/password",
    ]));
    let out = ok_out("SUDO_UID=65534 burrow run", &o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["65534", "65534", secret_value.as_str(), "400 65534"],
        "CMD under sudo: {out}\nstderr: {}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------
// 5. run --reroute

fn svc_json(c: &Cluster, ns: &str, name: &str) -> Value {
    let out = ok(kubectl(c, &["get", "svc", name, "-n", ns, "-o", "json"]));
    serde_json::from_str(&out).expect("svc json")
}

fn assert_service_restored(c: &Cluster, ns: &str, name: &str, before: &Value, when: &str) {
    let now = svc_json(c, ns, name);
    assert_eq!(
        now["spec"], before["spec"],
        "{when}: spec of {ns}/{name} not restored"
    );
    assert_eq!(
        now["metadata"]["annotations"], before["metadata"]["annotations"],
        "{when}: annotations of {ns}/{name} not restored"
    );
    assert_eq!(now["metadata"]["labels"], before["metadata"]["labels"]);
    assert_no_leftovers(c, ns, name);
}

/// Which "pod" answers `http://api.er-rr:8080/` from the caller pod.
fn api_answer(c: &Cluster, extra: &[&str]) -> Option<String> {
    let mut args = vec!["curl", "-sS", "--max-time", "5"];
    args.extend_from_slice(extra);
    args.push("http://api.er-rr:8080/");
    let o = run(in_caller(c, &args));
    o.status
        .success()
        .then(|| echo_pod_of(&stdout(&o)))
        .flatten()
}

/// The pid of the process whose environment has `marker`.
fn pid_with_env(marker: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
            && env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn run_reroute_reaches_cmd_and_restores() {
    let Some(c) = er() else { return };
    let ns = "er-rr";
    apply(
        &c,
        &[
            namespace(ns),
            deployment(
                ns,
                "api",
                json!({}),
                json!({"containers": [{"name": "echo", "image": "burrow/echo",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}),
            ),
            service(
                ns,
                "api",
                json!({"app": "api"}),
                json!([{"name": "http", "port": 8080, "targetPort": "http"}]),
            ),
        ],
    );
    let pod = ready_pod(&c, ns, "api");
    let pod_name = pod["metadata"]["name"].as_str().expect("name").to_string();
    eventually(
        Duration::from_secs(30),
        "the caller reaches api's pod",
        || (api_answer(&c, &[]).as_deref() == Some(pod_name.as_str())).then_some(()),
    );
    let before = svc_json(&c, ns, "api");
    let _l = connected(&c, 1, "default");
    let echo = bin_dir().join("mc-echo").display().to_string();

    // Global, CMD ends normally.
    let dir = scratch();
    let stop = dir.path().join("stop");
    let script = format!(
        "POD_NAME=laptop-run PORT=3000 {echo} & p=$!; while [ ! -e {s} ]; do sleep 0.1; done; kill $p; wait $p; exit 0",
        s = stop.display()
    );
    let k = kc(&c);
    let mut child = spawn_logged(
        laptop(&c, 1).burrow(&[
            "run",
            "deploy/api",
            "-n",
            ns,
            "--kubeconfig",
            &k,
            "--reroute",
            "8080:3000",
            "--",
            "sh",
            "-c",
            &script,
        ]),
        dir.path(),
        "global",
    );
    eventually(Duration::from_secs(60), "the caller reaches CMD", || {
        if let Ok(Some(st)) = child.try_wait() {
            let (out, err) = read_out(dir.path(), "global");
            panic!("burrow run --reroute exited early ({st}):\nstdout: {out}\nstderr: {err}");
        }
        (api_answer(&c, &[]).as_deref() == Some("laptop-run")).then_some(())
    });
    std::fs::write(&stop, "").expect("stop");
    let code = wait_exit(&mut child, "burrow run --reroute to end");
    let (_, err) = read_out(dir.path(), "global");
    assert_eq!(code, 0, "burrow run --reroute: {err}");
    assert_service_restored(&c, ns, "api", &before, "after CMD exited");
    eventually(
        Duration::from_secs(30),
        "the caller reaches api's pod again",
        || (api_answer(&c, &[]).as_deref() == Some(pod_name.as_str())).then_some(()),
    );

    // Personal (header), CMD killed with SIGKILL.
    let marker = format!("ER_MARK={}", unique("rr"));
    let script = format!("exec env {marker} POD_NAME=laptop-personal PORT=3001 {echo}");
    let mut child = spawn_logged(
        laptop(&c, 1).burrow(&[
            "run",
            "deploy/api",
            "-n",
            ns,
            "--kubeconfig",
            &k,
            "--reroute",
            "8080:3001",
            "--header",
            "x-burrow-route=me",
            "--",
            "sh",
            "-c",
            &script,
        ]),
        dir.path(),
        "personal",
    );
    eventually(Duration::from_secs(60), "the header reaches CMD", || {
        if let Ok(Some(st)) = child.try_wait() {
            let (out, err) = read_out(dir.path(), "personal");
            panic!(
                "burrow run --reroute --header exited early ({st}):\nstdout: {out}\nstderr: {err}"
            );
        }
        (api_answer(&c, &["-H", "x-burrow-route: me"]).as_deref() == Some("laptop-personal"))
            .then_some(())
    });
    assert_eq!(
        api_answer(&c, &[]).as_deref(),
        Some(pod_name.as_str()),
        "without the header the caller must reach the pod"
    );
    assert_eq!(
        api_answer(&c, &["-H", "x-burrow-route: someone-else"]).as_deref(),
        Some(pod_name.as_str())
    );
    let pid = pid_with_env(&marker).expect("CMD's process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 CMD");
    let code = wait_exit(&mut child, "burrow run to end after CMD was killed");
    let (_, err) = read_out(dir.path(), "personal");
    assert_eq!(
        code,
        128 + 9,
        "exit code of run whose CMD got SIGKILL: {err}"
    );
    assert_service_restored(&c, ns, "api", &before, "after CMD was killed");
    eventually(
        Duration::from_secs(30),
        "the header reaches the pod again",
        || {
            (api_answer(&c, &["-H", "x-burrow-route: me"]).as_deref() == Some(pod_name.as_str()))
                .then_some(())
        },
    );

    // Ctrl-C of run stops CMD and restores the reroute.
    let marker = format!("ER_MARK={}", unique("rr-int"));
    let script = format!("exec env {marker} POD_NAME=laptop-int PORT=3002 {echo}");
    let mut child = spawn_logged(
        laptop(&c, 1).burrow(&[
            "run",
            "deploy/api",
            "-n",
            ns,
            "--kubeconfig",
            &k,
            "--reroute",
            "8080:3002",
            "--",
            "sh",
            "-c",
            &script,
        ]),
        dir.path(),
        "int",
    );
    eventually(
        Duration::from_secs(60),
        "the caller reaches CMD (Ctrl-C case)",
        || {
            if let Ok(Some(st)) = child.try_wait() {
                let (out, err) = read_out(dir.path(), "int");
                panic!("burrow run --reroute exited early ({st}):\nstdout: {out}\nstderr: {err}");
            }
            (api_answer(&c, &[]).as_deref() == Some("laptop-int")).then_some(())
        },
    );
    let cmd_pid = pid_with_env(&marker).expect("CMD's process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to burrow run");
    let code = wait_exit(&mut child, "burrow run to end after SIGINT");
    let (_, err) = read_out(dir.path(), "int");
    assert_ne!(code, 0, "run after SIGINT: {err}");
    assert!(
        !Path::new(&format!("/proc/{cmd_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{cmd_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "CMD still runs after Ctrl-C of burrow run"
    );
    assert_service_restored(&c, ns, "api", &before, "after Ctrl-C");
}

// ---------------------------------------------------------------------------
// 6. errors

/// Runs `cmd` expecting a failure: stderr is burrow's own messages only
/// (lines starting `burrow: `, or indented continuations such as a hint),
/// the last `burrow: ` line and what follows it (the error and what to do)
/// contain every `needle`; that text.
fn expect_error(what: &str, cmd: Command, needles: &[&str]) -> String {
    let o = run(cmd);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "{what} must fail; stdout: {}\nstderr: {err}",
        stdout(&o)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.starts_with("burrow: ") || l.starts_with(' ')),
        "{what}: stderr must be burrow's messages (`burrow: ...`), got:\n{err}"
    );
    let last = lines
        .iter()
        .rposition(|l| l.starts_with("burrow: "))
        .unwrap_or_else(|| panic!("{what}: no `burrow: ` line in:\n{err}"));
    let message = lines[last..].join("\n");
    for n in needles {
        assert!(
            message.contains(n),
            "{what}: the error must mention {n:?}:\n{message}"
        );
    }
    message
}

#[test]
fn errors_are_one_line_and_leave_nothing() {
    let Some(c) = er() else { return };
    let ns = "er-err";
    apply(
        &c,
        &[
            namespace(ns),
            config_map(ns, "soon-gone", json!({"K": "v"})),
            config_map(ns, "keys", json!({"KEEP": "1", "DROP": "2"})),
            secret(ns, "soon-gone-secret", json!({"S": "v"})),
        ],
    );
    let with_env = |name: &str, env: Value| {
        deployment(
            ns,
            name,
            json!({}),
            json!({"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "infinity"], "env": env}]}),
        )
    };
    apply(
        &c,
        &[
            with_env(
                "cm-gone",
                json!([{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "soon-gone", "key": "K"}}}]),
            ),
            with_env(
                "key-gone",
                json!([{"name": "D", "valueFrom": {"configMapKeyRef": {"name": "keys", "key": "DROP"}}}]),
            ),
            with_env(
                "secret-gone",
                json!([{"name": "S", "valueFrom": {"secretKeyRef": {"name": "soon-gone-secret", "key": "S"}}}]),
            ),
        ],
    );
    let mut idle = with_env(
        "idle",
        json!([
            {"name": "PLAIN", "value": "plain"},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        ]),
    );
    idle["spec"]["replicas"] = json!(0);
    apply(&c, &[idle]);
    for app in ["cm-gone", "key-gone", "secret-gone"] {
        ready_pod(&c, ns, app);
    }
    // Gone after the pods started: the kubelet would refuse them now.
    ok(kubectl(&c, &["delete", "configmap", "soon-gone", "-n", ns]));
    ok(kubectl(
        &c,
        &["delete", "secret", "soon-gone-secret", "-n", ns],
    ));
    ok(kubectl(
        &c,
        &[
            "patch",
            "configmap",
            "keys",
            "-n",
            ns,
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/data/DROP"}]"#,
        ],
    ));

    expect_error(
        "env of a missing Deployment",
        env_cmd(&c, &["deploy/nope", "-n", ns]),
        &["nope"],
    );
    expect_error(
        "env of a missing workload (bare name)",
        env_cmd(&c, &["nothing-here", "-n", ns]),
        &["nothing-here"],
    );
    let dir = scratch();
    let marker = dir.path().join("cmd-ran");
    let touch = format!("touch {}", marker.display());
    expect_error(
        "run of a missing Deployment",
        run_cmd(&c, 1, &["deploy/nope", "-n", ns], &["sh", "-c", &touch]),
        &["nope"],
    );
    assert!(!marker.exists(), "CMD ran although the workload is missing");
    expect_error(
        "env of a workload without running pods",
        env_cmd(&c, &["deploy/idle", "-n", ns]),
        &["pod", "--allow-missing-pod-fields"],
    );
    let o = run(env_cmd(
        &c,
        &[
            "deploy/idle",
            "-n",
            ns,
            "--allow-missing-pod-fields",
            "-o",
            "json",
        ],
    ));
    let out = ok_out("env --allow-missing-pod-fields", &o);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["PLAIN"], "plain", "{out}");
    expect_error(
        "env with a missing ConfigMap",
        env_cmd(&c, &["deploy/cm-gone", "-n", ns]),
        &["soon-gone"],
    );
    expect_error(
        "env with a missing key",
        env_cmd(&c, &["deploy/key-gone", "-n", ns]),
        &["DROP", "keys"],
    );
    expect_error(
        "env with a missing Secret",
        env_cmd(&c, &["deploy/secret-gone", "-n", ns]),
        &["soon-gone-secret"],
    );
    expect_error(
        "run with a missing ConfigMap",
        run_cmd(&c, 1, &["deploy/cm-gone", "-n", ns], &["sh", "-c", &touch]),
        &["soon-gone"],
    );
    assert!(!marker.exists(), "CMD ran although a ConfigMap is missing");
}

#[test]
fn secrets_without_permission_and_skip_secrets() {
    let Some(c) = er() else { return };
    let ns = "er-perm";
    apply(
        &c,
        &[
            namespace(ns),
            config_map(ns, "cfg", json!({"FROM_CM": "cm"})),
            secret(ns, "private", json!({"PASSWORD": "hunter2"})),
        ],
    );
    apply(
        &c,
        &[deployment(
            ns,
            "app",
            json!({}),
            json!({"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "infinity"],
            "envFrom": [{"configMapRef": {"name": "cfg"}}],
            "env": [
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "private", "key": "PASSWORD"}}},
                {"name": "PLAIN", "value": "plain"}
            ]}]}),
        )],
    );
    let pod = ready_pod(&c, ns, "app");
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    let limited = c.limited_kubeconfig().display().to_string();
    let l = laptop(&c, 1);
    let env_as_dev = |extra: &[&str]| {
        let mut all = vec!["env", "deploy/app", "-n", ns, "--kubeconfig", &limited];
        all.extend_from_slice(extra);
        l.burrow(&all)
    };
    expect_error(
        "env as a view-only user",
        env_as_dev(&[]),
        &["private", "get secrets", "--skip-secrets"],
    );
    let o = run(env_as_dev(&["--skip-secrets", "-o", "json"]));
    let out = ok_out("env --skip-secrets as a view-only user", &o);
    let got: BTreeMap<String, String> = serde_json::from_str(&out).expect("json");
    let mut want = real_env(&c, ns, &name, "c");
    assert_eq!(want.remove("PASSWORD").as_deref(), Some("hunter2"));
    assert_same_env("--skip-secrets", &got, &want);
}

#[test]
fn reroute_of_a_missing_port_is_refused_before_anything() {
    let Some(c) = er() else { return };
    let ns = "er-noport";
    apply(
        &c,
        &[
            namespace(ns),
            deployment(
                ns,
                "web",
                json!({}),
                json!({"containers": [{"name": "echo", "image": "burrow/echo", "ports": [{"containerPort": 8080}]}]}),
            ),
            service(
                ns,
                "web",
                json!({"app": "web"}),
                json!([{"name": "http", "port": 8080, "targetPort": 8080}]),
            ),
        ],
    );
    ready_pod(&c, ns, "web");
    let before = svc_json(&c, ns, "web");
    let _l = connected(&c, 1, "default");
    let dir = scratch();
    let marker = dir.path().join("cmd-ran");
    let touch = format!("touch {}", marker.display());
    let k = kc(&c);
    expect_error(
        "run --reroute of a port the Service lacks",
        laptop(&c, 1).burrow(&[
            "run",
            "deploy/web",
            "-n",
            ns,
            "--kubeconfig",
            &k,
            "--reroute",
            "9999",
            "--",
            "sh",
            "-c",
            &touch,
        ]),
        &["9999"],
    );
    assert!(!marker.exists(), "CMD ran although the reroute was refused");
    let now = svc_json(&c, ns, "web");
    assert_eq!(
        now["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"],
        "the Service changed"
    );
    assert_service_restored(&c, ns, "web", &before, "after the refused reroute");
}

// ---------------------------------------------------------------------------
// run connects first

#[test]
fn run_connects_first_when_not_connected() {
    let Some(c) = shared_cluster_alone("er", 2) else {
        return;
    };
    let ns = "er-first";
    apply(
        &c,
        &[
            namespace(ns),
            deployment(ns, "x", json!({}), json!({"containers": [sleeper("c")]})),
        ],
    );
    ready_pod(&c, ns, "x");
    let l = laptop(&c, 1);
    {
        let _one = CONNECTING.lock().unwrap_or_else(|p| p.into_inner());
        if is_connected(&l).is_some() {
            l.disconnect();
        }
    }
    assert!(is_connected(&l).is_none());
    let o = run(run_cmd(
        &c,
        1,
        &["deploy/x", "-n", ns],
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://web.default/",
        ],
    ));
    let out = ok_out("burrow run while disconnected", &o);
    assert_eq!(out.trim(), "200");
    assert!(is_connected(&l).is_some(), "burrow run did not connect");
}
