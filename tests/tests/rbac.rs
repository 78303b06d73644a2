//! Acceptance of the shipped permissions (issue 13, point 7), in one
//! miniature cluster with the real binaries: an admin runs `burrow
//! install`, binds user `dana` with exactly the lines it prints (connect,
//! and reroute for namespace `team`); dana, with no other right, connects,
//! reaches Services by name in every namespace, reroutes a Service of
//! `team`, and is refused, with nothing changed, for a Service of another
//! namespace. Also: the gateway's NetworkPolicy and the roles come with
//! install and go with uninstall.
//!
//! One cluster for the binary (common::shared): the first test applies
//! `team`, installs and binds dana; each point is a test of its own
//! (`cargo test --test rbac another_namespace`):
//! - `install_brings_the_networkpolicy_and_the_roles_bound_to_nobody`
//! - `connect_with_only_the_shipped_roles_port_forward_no_node_access`
//! - `services_by_name_in_every_namespace`
//! - `reroute_a_service_of_team_stop_restores_it`
//! - `refused_for_a_service_of_another_namespace_nothing_changed`
//! - `the_optional_connect_cluster_role_udp_to_the_nodeport`
//! - `uninstall_removes_the_networkpolicy_and_the_roles_names_the_bindings_left`
//!
//! The install check, the Services by name and the refusal change nothing
//! and share the cluster (connecting dana if she is not); the others
//! connect afresh, reroute `team/api`, bind a role or uninstall, so they
//! take it alone and leave it as they found it (the optional role's
//! binding deleted again; after the uninstall the gateway installed again
//! and dana's binding in burrow-system, gone with the namespace, made
//! again).

mod common;

use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::Value;

const TEAM: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: team
  labels:
    app: api
spec:
  replicas: 1
  selector:
    matchLabels:
      app: api
  template:
    metadata:
      labels:
        app: api
    spec:
      containers:
        - name: api
          image: burrow/echo:latest
          ports:
            - name: http
              containerPort: 8080
          env:
            - name: PORT
              value: "8080"
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          readinessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: team
  labels:
    app: api
spec:
  selector:
    app: api
  ports:
    - name: http
      port: 8080
      targetPort: http
      protocol: TCP
"#;

/// The developer: a client certificate, no group but the authenticated.
const USER: &str = "dana";

struct Setup<'a> {
    c: &'a Cluster,
    laptop: Laptop<'a>,
    /// dana's kubeconfig (for laptops).
    dana: String,
}

impl Setup<'_> {
    /// `burrow ARGS --kubeconfig <dana's>`.
    fn as_dana(&self, args: &[&str]) -> Command {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--kubeconfig", &self.dana]);
        self.laptop.burrow(&all)
    }

    /// `burrow ARGS --kubeconfig <admin's>`, asserting success; stdout.
    fn as_admin(&self, args: &[&str]) -> String {
        let kc = self.c.kubeconfig().display().to_string();
        let mut all = args.to_vec();
        all.extend_from_slice(&["--kubeconfig", &kc]);
        ok(self.laptop.burrow(&all))
    }

    /// Runs as dana; asserts success with the daemon's log on failure.
    fn dana_ok(&self, args: &[&str]) -> String {
        let o = run(self.as_dana(args));
        assert!(
            o.status.success(),
            "burrow {args:?} as {USER} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            o.status,
            stdout(&o),
            stderr(&o),
            self.laptop.daemon_log()
        );
        format!("{}{}", stdout(&o), stderr(&o))
    }

    fn svc(&self, ns: &str, name: &str) -> Value {
        let out = ok(kubectl(
            self.c,
            &["get", "svc", name, "-n", ns, "-o", "json"],
        ));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("svc json: {e}: {out}"))
    }

    /// The Service's spec and annotations equal `before`'s, and burrow left
    /// nothing beside it.
    fn assert_unchanged(&self, ns: &str, name: &str, before: &Value) {
        let now = self.svc(ns, name);
        assert_eq!(now["spec"], before["spec"], "spec of {ns}/{name}");
        assert_eq!(
            now["metadata"]["annotations"], before["metadata"]["annotations"],
            "annotations of {ns}/{name}"
        );
        assert_no_leftovers(self.c, ns, name);
    }

    /// Which pod answered `url` from the caller pod.
    fn caller_reaches(&self, url: &str) -> String {
        let body = ok(in_caller(self.c, &["curl", "-sS", "--max-time", "10", url]));
        let v: Value = serde_json::from_str(body.trim())
            .unwrap_or_else(|e| panic!("echo answer is not JSON ({e}): {body}"));
        v["pod"].as_str().unwrap_or_default().to_string()
    }

    /// `kubectl` lines of `burrow install`'s output whose text contains
    /// `what`, with USER and NAMESPACE filled in, run with the host's admin
    /// kubeconfig.
    fn bind_as_printed(&self, printed: &str, what: &str) {
        let lines: Vec<&str> = printed
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("kubectl ") && l.contains(what))
            .collect();
        assert_eq!(lines.len(), 1, "one line with {what:?} in:\n{printed}");
        let line = lines[0].replace("USER", USER).replace("NAMESPACE", "team");
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = ok(kubectl(self.c, &args));
        assert!(out.contains("created"), "{line}: {out}");
    }
}

fn rb() -> Option<SharedCluster> {
    shared_cluster("rb", 1)
}

/// The binary's cluster, for a point that changes it for a while.
fn rb_alone() -> Option<SharedCluster> {
    shared_cluster_alone("rb", 1)
}

/// `team` applied, the gateway installed and dana bound, by the first
/// point.
struct Fixture {
    api_pod: String,
    /// What `burrow install` printed.
    printed: String,
    api_before: Value,
    echo_before: Value,
    /// The laptop's server (running until the cluster goes).
    _server: Mutex<Child>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();
/// One connect at a time.
static CONNECTING: Mutex<()> = Mutex::new(());

/// The laptop (run dir in the cluster's state dir) as dana and the
/// fixture.
fn setup(c: &Cluster) -> (Setup<'_>, &'static Fixture) {
    let dana = c.kubeconfig_for(USER, &[]).expect("dana's kubeconfig");
    let s = Setup {
        c,
        laptop: Laptop::new(c, 1, c.state_dir().join("burrow-run-rbac")),
        dana: dana.display().to_string(),
    };
    let f = FIXTURE.get_or_init(|| fixture(c, &s));
    (s, f)
}

fn fixture(c: &Cluster, s: &Setup) -> Fixture {
    let bin = bin_dir();
    kubectl_apply(c, TEAM);
    let api_pod = eventually(Duration::from_secs(30), "a pod of team/api", || {
        let o = run(kubectl(
            c,
            &[
                "get",
                "pods",
                "-n",
                "team",
                "-l",
                "app=api",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ],
        ));
        let name = stdout(&o).trim().to_string();
        (!name.is_empty()).then_some(name)
    });
    wait_pod_ready(c, "team", &api_pod);
    // A Ready pod is not yet a Service that answers: kube-proxy writes the
    // rule up to a sync period later (the laptop's first curl was refused,
    // exit 7, about one run in three).
    eventually(
        Duration::from_secs(30),
        "team/api to answer its Service",
        || {
            run(in_caller(
                c,
                &["curl", "-sf", "--max-time", "2", "http://api.team:8080/"],
            ))
            .status
            .success()
            .then_some(())
        },
    );
    let server = s.laptop.spawn(
        &[("POD_NAME", "laptop-dana"), ("PORT", "3000")],
        &[&bin.join("mc-echo").display().to_string()],
    );
    eventually(Duration::from_secs(10), "local echo server up", || {
        run(s
            .laptop
            .on(&["curl", "-sf", "http://127.0.0.1:3000/healthz"]))
        .status
        .success()
        .then_some(())
    });

    // The admin installs and binds dana as the output says; dana has no
    // other right (every authenticated user may only review its access).
    let printed = s.as_admin(&["install"]);
    eprintln!("burrow install:\n{printed}");
    s.bind_as_printed(&printed, "--role=burrow-connect ");
    s.bind_as_printed(&printed, "--clusterrole=burrow-reroute ");

    Fixture {
        api_pod,
        printed,
        api_before: s.svc("team", "api"),
        echo_before: s.svc("default", "echo"),
        _server: Mutex::new(server),
    }
}

impl Setup<'_> {
    /// dana connected (`connect -n team`) when she is not.
    fn dana_connected(&self) {
        let _one = CONNECTING.lock().unwrap_or_else(|p| p.into_inner());
        if !self.laptop.connected() {
            self.dana_ok(&["connect", "-n", "team"]);
        }
    }

    /// The kubectl line of `printed` whose text contains `what`, made a
    /// `delete` of the object it creates (run with the host's admin
    /// kubeconfig).
    fn unbind_as_printed(&self, printed: &str, what: &str) {
        let line = printed
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("kubectl ") && l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?} in:\n{printed}"));
        let line = line.replace("USER", USER).replace("NAMESPACE", "team");
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        let create = words
            .iter()
            .position(|w| *w == "create")
            .unwrap_or_else(|| panic!("no create in {line}"));
        let mut args = words[..create].to_vec();
        args.push("delete");
        args.extend_from_slice(&words[create + 1..create + 3]);
        ok(kubectl(self.c, &args));
    }
}

/// install: the NetworkPolicy and the roles, bound to nobody
#[test]
fn install_brings_the_networkpolicy_and_the_roles_bound_to_nobody() {
    let Some(ref c) = rb() else { return };
    let (s, _) = setup(c);

    let out = ok(kubectl(c, &["get", "networkpolicy", "-A"]));
    assert!(
        out.lines().any(|l| l.starts_with("burrow-system")
            && l.contains("burrow-gateway")
            && l.contains("app.kubernetes.io/name=burrow-gateway")),
        "{out}"
    );
    let out = ok(kubectl(
        c,
        &[
            "get",
            "clusterroles",
            "-l",
            "app.kubernetes.io/managed-by=burrow",
            "-o",
            "name",
        ],
    ));
    for role in ["burrow-gateway", "burrow-reroute", "burrow-connect-cluster"] {
        assert!(
            out.contains(&format!("clusterrole.rbac.authorization.k8s.io/{role}")),
            "{out}"
        );
    }
    ok(kubectl(
        c,
        &["get", "role", "-n", "burrow-system", "burrow-connect"],
    ));
    // Only the bindings made above name the developers' roles.
    let out = ok(kubectl(
        c,
        &[
            "get",
            "rolebindings,clusterrolebindings",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.roleRef.name}={.subjects[*].name}{\"\\n\"}{end}",
        ],
    ));
    let mut ours: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("burrow-") && !l.starts_with("burrow-gateway="))
        .collect();
    ours.sort_unstable();
    assert_eq!(
        ours,
        ["burrow-connect=dana", "burrow-reroute=dana"],
        "{out}"
    );
    let o = run(s.laptop.on(&[
        "kubectl",
        "--kubeconfig",
        &s.dana,
        "auth",
        "can-i",
        "list",
        "services",
        "-n",
        "default",
    ]));
    assert_eq!(
        stdout(&o).trim(),
        "no",
        "{USER} may read default's Services"
    );
}

/// connect with only the shipped roles: port-forward, no node access
#[test]
fn connect_with_only_the_shipped_roles_port_forward_no_node_access() {
    let Some(ref c) = rb_alone() else { return };
    let (s, f) = setup(c);
    // A connect of its own.
    if s.laptop.connected() {
        ok(s.laptop.burrow(&["disconnect"]));
    }

    let out = s.dana_ok(&["connect", "-n", "team"]);
    eprintln!("connect as {USER}:\n{out}");
    let st = s.laptop.status_json();
    assert_eq!(st["connected"], true, "{st}");
    assert_eq!(st["transport"], "port-forward", "{st}");
    let reason = st["transport_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("nodes") && reason.contains("403"), "{st}");
    // The pod range without nodes: from team's EndpointSlices.
    let routes = st["routes"].to_string();
    assert!(routes.contains("10.244.0.0/16"), "{st}");
    let pod_ip = jsonpath(
        c,
        &["get", "pods", "-n", "team", "-l", "app=api"],
        "{.items[0].status.podIP}",
    );
    let url = format!("http://{pod_ip}:8080/");
    let body = s.laptop.ok(&["curl", "-sS", "--max-time", "10", &url]);
    assert!(body.contains(&f.api_pod), "{body}");
}

/// Services by name in every namespace
#[test]
fn services_by_name_in_every_namespace() {
    let Some(ref c) = rb() else { return };
    let (s, f) = setup(c);
    s.dana_connected();

    let body = s
        .laptop
        .ok(&["curl", "-sS", "--max-time", "10", "http://api:8080/"]);
    assert!(body.contains(&f.api_pod), "{body}");
    let body = s.laptop.ok(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://echo.default:8080/",
    ]);
    assert!(body.contains("\"pod\":\"echo-"), "{body}");
    let body = s
        .laptop
        .ok(&["curl", "-sS", "--max-time", "10", "http://web.default/"]);
    assert!(body.contains("Welcome to nginx"), "{body}");
    let pong = s.laptop.ok(&["redis-cli", "-h", "redis.data", "ping"]);
    assert_eq!(pong.trim(), "PONG");
}

/// reroute a Service of team, stop restores it
#[test]
fn reroute_a_service_of_team_stop_restores_it() {
    let Some(ref c) = rb_alone() else { return };
    let (s, f) = setup(c);
    s.dana_connected();

    let out = s.dana_ok(&["reroute", "api", "-n", "team", "--port", "8080:3000"]);
    assert!(out.contains("rerouted team/api port 8080"), "{out}");
    assert_eq!(s.caller_reaches("http://api.team:8080/"), "laptop-dana");
    let out = s.dana_ok(&["reroute", "--stop", "api", "-n", "team"]);
    assert!(out.contains("restored team/api"), "{out}");
    s.assert_unchanged("team", "api", &f.api_before);
    assert_eq!(s.caller_reaches("http://api.team:8080/"), f.api_pod);
}

/// refused for a Service of another namespace, nothing changed
#[test]
fn refused_for_a_service_of_another_namespace_nothing_changed() {
    let Some(ref c) = rb() else { return };
    let (s, f) = setup(c);
    s.dana_connected();

    let o = run(s.as_dana(&["reroute", "echo", "-n", "default", "--port", "8080:3000"]));
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    eprintln!("reroute of default/echo as {USER}: {err}");
    assert!(
        err.contains("403")
            && err.contains(r#"resource "services""#)
            && err.contains(r#"namespace "default""#)
            && (err.contains("cannot get") || err.contains("cannot patch"))
            && err.contains("burrow-reroute")
            && err.contains("nothing was changed"),
        "{err}"
    );
    let now = s.svc("default", "echo");
    assert_eq!(
        now["metadata"]["resourceVersion"], f.echo_before["metadata"]["resourceVersion"],
        "the Service changed"
    );
    s.assert_unchanged("default", "echo", &f.echo_before);
    assert!(
        s.caller_reaches("http://echo.default:8080/")
            .starts_with("echo-")
    );
    // Still connected, the reroute of team still possible.
    assert_eq!(s.laptop.status_json()["connected"], true);
}

/// the optional burrow-connect-cluster role: UDP to the NodePort
#[test]
fn the_optional_connect_cluster_role_udp_to_the_nodeport() {
    let Some(ref c) = rb_alone() else { return };
    let (s, f) = setup(c);
    s.dana_connected();

    s.bind_as_printed(&f.printed, "--clusterrole=burrow-connect-cluster ");
    ok(s.laptop.burrow(&["disconnect"]));
    s.dana_ok(&["connect", "-n", "team"]);
    let st = s.laptop.status_json();
    assert_eq!(st["transport"], "udp", "{st}");
    let body = s
        .laptop
        .ok(&["curl", "-sS", "--max-time", "10", "http://api:8080/"]);
    assert!(body.contains(&f.api_pod), "{body}");
    // As it was: the role bound to nobody, dana not connected.
    s.unbind_as_printed(&f.printed, "--clusterrole=burrow-connect-cluster ");
    ok(s.laptop.burrow(&["disconnect"]));
}

/// uninstall removes the NetworkPolicy and the roles, names the bindings left
#[test]
fn uninstall_removes_the_networkpolicy_and_the_roles_names_the_bindings_left() {
    let Some(ref c) = rb_alone() else { return };
    let (s, f) = setup(c);

    let _ = run(s.laptop.burrow(&["disconnect"]));
    let out = s.as_admin(&["uninstall"]);
    assert!(
        out.contains("kubectl -n team delete rolebinding burrow-reroute-dana"),
        "{out}"
    );
    let out = ok(kubectl(c, &["get", "networkpolicy", "-A", "-o", "name"]));
    assert!(out.trim().is_empty(), "NetworkPolicies left: {out}");
    let out = ok(kubectl(
        c,
        &[
            "get",
            "clusterroles",
            "-l",
            "app.kubernetes.io/managed-by=burrow",
            "-o",
            "name",
        ],
    ));
    assert!(out.trim().is_empty(), "ClusterRoles left: {out}");
    s.assert_unchanged("team", "api", &f.api_before);
    // As it was: installed and dana bound (her binding in burrow-system
    // went with the namespace; the one in team was left).
    s.as_admin(&["install"]);
    s.bind_as_printed(&f.printed, "--role=burrow-connect ");
}
