//! Acceptance of the shipped permissions (issue 13, point 7), in one
//! miniature cluster with the real binaries: an admin runs `burrow
//! install`, binds user `dana` with exactly the lines it prints (connect,
//! and reroute for namespace `team`); dana, with no other right, connects,
//! reaches Services by name in every namespace, reroutes a Service of
//! `team`, and is refused, with nothing changed, for a Service of another
//! namespace. Also: the gateway's NetworkPolicy and the roles come with
//! install and go with uninstall.
//!
//! Every point runs even when an earlier one failed; the failures are
//! listed at the end.

mod common;

use std::process::Command;
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
    _dir: tempfile::TempDir,
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

#[test]
fn shipped_roles_acceptance() {
    let Some(c) = cluster("rb", 1) else { return };
    let bin = bin_dir();
    let dana = c.kubeconfig_for(USER, &[]).expect("dana's kubeconfig");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Setup {
        c: &c,
        laptop: Laptop::new(&c, 1, dir.path().join("run")),
        _dir: dir,
        dana: dana.display().to_string(),
    };

    kubectl_apply(&c, TEAM);
    let api_pod = eventually(Duration::from_secs(30), "a pod of team/api", || {
        let o = run(kubectl(
            &c,
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
    wait_pod_ready(&c, "team", &api_pod);
    // A Ready pod is not yet a Service that answers: kube-proxy writes the
    // rule up to a sync period later (the laptop's first curl was refused,
    // exit 7, about one run in three).
    eventually(
        Duration::from_secs(30),
        "team/api to answer its Service",
        || {
            run(in_caller(
                &c,
                &["curl", "-sf", "--max-time", "2", "http://api.team:8080/"],
            ))
            .status
            .success()
            .then_some(())
        },
    );
    let mut server = s.laptop.spawn(
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
    let api_before = s.svc("team", "api");
    let echo_before = s.svc("default", "echo");

    let mut points = Points::new("rbac");
    let mut point = |name: &str, f: &dyn Fn()| points.point(name, f);

    point(
        "install: the NetworkPolicy and the roles, bound to nobody",
        &|| {
            let out = ok(kubectl(&c, &["get", "networkpolicy", "-A"]));
            assert!(
                out.lines().any(|l| l.starts_with("burrow-system")
                    && l.contains("burrow-gateway")
                    && l.contains("app.kubernetes.io/name=burrow-gateway")),
                "{out}"
            );
            let out = ok(kubectl(
                &c,
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
                &c,
                &["get", "role", "-n", "burrow-system", "burrow-connect"],
            ));
            // Only the bindings made above name the developers' roles.
            let out = ok(kubectl(
                &c,
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
        },
    );

    point(
        "connect with only the shipped roles: port-forward, no node access",
        &|| {
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
                &c,
                &["get", "pods", "-n", "team", "-l", "app=api"],
                "{.items[0].status.podIP}",
            );
            let url = format!("http://{pod_ip}:8080/");
            let body = s.laptop.ok(&["curl", "-sS", "--max-time", "10", &url]);
            assert!(body.contains(&api_pod), "{body}");
        },
    );

    point("Services by name in every namespace", &|| {
        let body = s
            .laptop
            .ok(&["curl", "-sS", "--max-time", "10", "http://api:8080/"]);
        assert!(body.contains(&api_pod), "{body}");
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
    });

    point("reroute a Service of team, stop restores it", &|| {
        let out = s.dana_ok(&["reroute", "api", "-n", "team", "--port", "8080:3000"]);
        assert!(out.contains("rerouted team/api port 8080"), "{out}");
        assert_eq!(s.caller_reaches("http://api.team:8080/"), "laptop-dana");
        let out = s.dana_ok(&["reroute", "--stop", "api", "-n", "team"]);
        assert!(out.contains("restored team/api"), "{out}");
        s.assert_unchanged("team", "api", &api_before);
        assert_eq!(s.caller_reaches("http://api.team:8080/"), api_pod);
    });

    point(
        "refused for a Service of another namespace, nothing changed",
        &|| {
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
                now["metadata"]["resourceVersion"], echo_before["metadata"]["resourceVersion"],
                "the Service changed"
            );
            s.assert_unchanged("default", "echo", &echo_before);
            assert!(
                s.caller_reaches("http://echo.default:8080/")
                    .starts_with("echo-")
            );
            // Still connected, the reroute of team still possible.
            assert_eq!(s.laptop.status_json()["connected"], true);
        },
    );

    point(
        "the optional burrow-connect-cluster role: UDP to the NodePort",
        &|| {
            s.bind_as_printed(&printed, "--clusterrole=burrow-connect-cluster ");
            ok(s.laptop.burrow(&["disconnect"]));
            s.dana_ok(&["connect", "-n", "team"]);
            let st = s.laptop.status_json();
            assert_eq!(st["transport"], "udp", "{st}");
            let body = s
                .laptop
                .ok(&["curl", "-sS", "--max-time", "10", "http://api:8080/"]);
            assert!(body.contains(&api_pod), "{body}");
        },
    );

    point(
        "uninstall removes the NetworkPolicy and the roles, names the bindings left",
        &|| {
            let _ = run(s.laptop.burrow(&["disconnect"]));
            let out = s.as_admin(&["uninstall"]);
            assert!(
                out.contains("kubectl -n team delete rolebinding burrow-reroute-dana"),
                "{out}"
            );
            let out = ok(kubectl(&c, &["get", "networkpolicy", "-A", "-o", "name"]));
            assert!(out.trim().is_empty(), "NetworkPolicies left: {out}");
            let out = ok(kubectl(
                &c,
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
            s.assert_unchanged("team", "api", &api_before);
        },
    );

    let _ = server.kill();
    let _ = server.wait();
    points.finish();
}
