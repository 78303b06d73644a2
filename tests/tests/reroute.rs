//! Acceptance of `burrow reroute` (issue 6), in one miniature cluster with
//! two laptops and the real binaries. Callers are the `caller` pod; the
//! laptops run their own `mc-echo` (answering with POD_NAME laptop-alice /
//! laptop-bob) and redis-server on 127.0.0.1.
//!
//! Every point runs even when an earlier one failed; the failures are
//! listed at the end.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[test]
fn reroute_acceptance() {
    let Some(c) = cluster("rr", 2) else { return };
    let s = Setup::new(&c);
    let bin = s.bin.clone();
    let echo = bin.join("mc-echo").display().to_string();
    let mut servers = vec![
        s.spawn(
            1,
            &[("POD_NAME", "laptop-alice"), ("PORT", "3000")],
            &[&echo],
        ),
        s.spawn(2, &[("POD_NAME", "laptop-bob"), ("PORT", "3000")], &[&echo]),
        s.spawn(
            1,
            &[],
            &[
                "redis-server",
                "--port",
                "6390",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        ),
    ];
    for n in [1, 2] {
        eventually(Duration::from_secs(10), "local echo server up", || {
            run(s.on(n, &["curl", "-sf", "http://127.0.0.1:3000/healthz"]))
                .status
                .success()
                .then_some(())
        });
    }
    eventually(Duration::from_secs(10), "local redis up", || {
        run(s.on(1, &["redis-cli", "-p", "6390", "ping"]))
            .status
            .success()
            .then_some(())
    });
    ok(s.on(
        1,
        &["redis-cli", "-p", "6390", "set", "whoami", "the-laptop"],
    ));
    let echo_before = s.svc("default", "echo");
    let redis_before = s.svc("data", "redis");
    let pods_before = s.pods();

    let mut points = Points::new("reroute");
    let mut point = |name: &str, f: &dyn Fn()| points.point(name, f);

    point(
        "5 no permission to patch Services: 403, nothing changes",
        &|| {
            let limited = c.limited_kubeconfig();
            let o = run(s.burrow_with(
                2,
                Some(&limited),
                &["reroute", "echo", "--port", "8080:3000"],
            ));
            assert!(
                !o.status.success(),
                "the developer's reroute must fail: {}",
                stdout(&o)
            );
            let err = stderr(&o);
            eprintln!("developer's reroute: {err}");
            assert!(
                err.contains("403") && err.contains("patch") && err.contains("services"),
                "{err}"
            );
            assert!(err.contains("nothing was changed"), "{err}");
            let now = s.svc("default", "echo");
            assert_eq!(
                now["metadata"]["resourceVersion"], echo_before["metadata"]["resourceVersion"],
                "the Service changed"
            );
            s.assert_restored("default", "echo", &echo_before);
            assert!(
                !s.run_dir(2).join("daemon.sock").exists(),
                "a daemon was started"
            );
        },
    );

    point("errors: Service missing, port missing", &|| {
        let kc = c.kubeconfig();
        let o = run(s.burrow_with(1, Some(&kc), &["reroute", "nope", "--port", "80:3000"]));
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(
            err.contains("Service nope not found in namespace default") && err.contains("echo"),
            "{err}"
        );
        let o = run(s.burrow_with(1, Some(&kc), &["reroute", "echo", "--port", "9999:3000"]));
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(
            err.contains("has no port 9999") && err.contains("8080 (http, TCP)"),
            "{err}"
        );
    });

    point(
        "1 global reroute reaches the laptop; --stop restores exactly",
        &|| {
            let out = s.reroute(1, &["echo", "--port", "http:3000"]);
            assert!(out.contains("rerouted default/echo port 8080"), "{out}");
            assert_eq!(s.echo_pod(&[]), "laptop-alice");
            // A second laptop's global reroute is refused, naming the holder.
            let kc = c.kubeconfig();
            let o = run(s.burrow_with(2, Some(&kc), &["reroute", "echo", "--port", "8080:3000"]));
            assert!(!o.status.success(), "{}", stdout(&o));
            let err = stderr(&o);
            assert!(
                err.contains("already rerouted to laptop")
                    && err.contains("since")
                    && err.contains("--force"),
                "{err}"
            );
            assert_eq!(s.echo_pod(&[]), "laptop-alice");
            let list = ok(s.burrow(1, &["reroute", "--list", "-o", "json"]));
            let list: Value = serde_json::from_str(&list).expect("list json");
            assert_eq!(list[0]["service"], "echo", "{list}");
            assert_eq!(list[0]["mine"], true, "{list}");
            let out = s.stop(1, "echo", "default");
            assert!(out.contains("restored default/echo"), "{out}");
            assert_ne!(s.echo_pod(&[]), "laptop-alice");
            assert!(s.echo_pod(&[]).starts_with("echo-"));
            s.assert_restored("default", "echo", &echo_before);
            assert_eq!(s.pods(), pods_before, "pods were restarted or replaced");
        },
    );

    point(
        "nothing listening locally: 502 at once, a log line on the laptop",
        &|| {
            s.reroute(1, &["echo", "--port", "8080:3999", "--protocol", "http"]);
            let o = run(in_caller(
                &c,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "10",
                    "http://echo.default:8080/",
                ],
            ));
            assert_eq!(stdout(&o).trim(), "502", "{}", stderr(&o));
            let log = std::fs::read_to_string(s.run_dir(1).join("daemon.log")).unwrap_or_default();
            assert!(log.contains("nothing answers on 127.0.0.1:3999"), "{log}");
            s.stop(1, "echo", "default");
            s.assert_restored("default", "echo", &echo_before);
        },
    );

    point(
        "3 raw TCP: redis.data:6379 to the laptop's redis-server",
        &|| {
            s.reroute(1, &["redis", "-n", "data", "--port", "6379:6390"]);
            let got = ok(in_caller(
                &c,
                &["redis-cli", "-h", "redis.data", "get", "whoami"],
            ));
            assert_eq!(got.trim(), "the-laptop");
            s.stop(1, "redis", "data");
            let got = ok(in_caller(
                &c,
                &["redis-cli", "-h", "redis.data", "get", "whoami"],
            ));
            assert_eq!(got.trim(), "", "the cluster's redis has no such key");
            s.assert_restored("data", "redis", &redis_before);
        },
    );

    point(
        "2 header routes of two laptops, keep-alive and h2c",
        &|| {
            s.reroute(
                1,
                &[
                    "echo",
                    "--port",
                    "8080:3000",
                    "--header",
                    "x-burrow-route=alice",
                ],
            );
            s.reroute(
                2,
                &[
                    "echo",
                    "--port",
                    "8080:3000",
                    "--header",
                    "x-burrow-route=bob",
                ],
            );
            let url = "http://echo.default:8080/";
            // One curl, one connection, four requests.
            let o = run(in_caller(
                &c,
                &[
                    "curl",
                    "-sS",
                    "-v",
                    "--max-time",
                    "10",
                    url,
                    "-H",
                    "x-burrow-route: alice",
                    "--next",
                    url,
                    "--next",
                    url,
                    "-H",
                    "x-burrow-route: bob",
                    "--next",
                    url,
                ],
            ));
            assert!(o.status.success(), "{}", stderr(&o));
            let got = pods_in(&stdout(&o));
            assert_eq!(got.len(), 4, "{got:?}");
            assert_eq!(got[0], "laptop-alice");
            assert!(got[1].starts_with("echo-"), "{got:?}");
            assert_eq!(got[2], "laptop-bob");
            assert!(got[3].starts_with("echo-"), "{got:?}");
            let verbose = stderr(&o);
            assert!(
                verbose.matches("Re-using existing connection").count() >= 3,
                "not one keep-alive connection:\n{verbose}"
            );
            // h2c with prior knowledge: the same per stream.
            let h2 = ["--http2-prior-knowledge"];
            for (header, want) in [("alice", "laptop-alice"), ("bob", "laptop-bob")] {
                let h = format!("x-burrow-route: {header}");
                let body = s.curl_in_caller(&[h2[0], url, "-H", &h]);
                assert_eq!(pod_field(&body), want);
                let v: Value = serde_json::from_str(body.trim()).expect("json");
                assert_eq!(v["version"], "HTTP/2.0");
            }
            assert!(pod_field(&s.curl_in_caller(&[h2[0], url])).starts_with("echo-"));
            s.stop(2, "echo", "default");
            assert_eq!(s.echo_pod(&["-H", "x-burrow-route: alice"]), "laptop-alice");
            s.stop(1, "echo", "default");
            s.assert_restored("default", "echo", &echo_before);
        },
    );

    point(
        "4a kill -9 of the daemon: the lease runs out, the Service is restored",
        &|| {
            s.reroute(1, &["echo", "--port", "8080:3000"]);
            assert_eq!(s.echo_pod(&[]), "laptop-alice");
            let pid = s.daemon_pid(1);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill -9 the daemon");
            let killed = Instant::now();
            // A bound for a hang, not a performance assertion: the lease is 15 s.
            eventually(
                Duration::from_secs(30),
                "selector restored after the lease",
                || (!s.selector("default", "echo").is_null()).then_some(()),
            );
            eprintln!("restored {:?} after kill -9", killed.elapsed());
            s.assert_restored("default", "echo", &echo_before);
            assert!(s.echo_pod(&[]).starts_with("echo-"));
            // The next command cleans the dead daemon's leftovers.
            ok(s.burrow(1, &["disconnect"]));
        },
    );

    point(
        "4b gateway pod deleted: the reroute resumes on the new pod",
        &|| {
            s.reroute(2, &["echo", "--port", "8080:3000"]);
            assert_eq!(s.echo_pod(&[]), "laptop-bob");
            let old = ok(kubectl(
                &c,
                &[
                    "get",
                    "pods",
                    "-n",
                    "burrow-system",
                    "-o",
                    "jsonpath={.items[0].metadata.name}",
                ],
            ));
            ok(kubectl(
                &c,
                &[
                    "delete",
                    "pod",
                    "-n",
                    "burrow-system",
                    old.trim(),
                    "--wait=false",
                ],
            ));
            eventually(
                Duration::from_secs(90),
                "laptop-bob answers through the new gateway pod",
                || {
                    let pods = run(kubectl(
                        &c,
                        &["get", "pods", "-n", "burrow-system", "-o", "name"],
                    ));
                    if stdout(&pods).contains(old.trim()) {
                        return None;
                    }
                    let o = run(in_caller(
                        &c,
                        &["curl", "-s", "--max-time", "3", "http://echo.default:8080/"],
                    ));
                    let body = stdout(&o);
                    (o.status.success() && body.contains("laptop-bob")).then_some(())
                },
            );
            let st: Value =
                serde_json::from_str(&ok(s.burrow(2, &["status", "-o", "json"]))).expect("status");
            assert!(st["reconnects"].as_u64().unwrap_or(0) >= 1, "{st}");
        },
    );

    point("6 disconnect and uninstall restore", &|| {
        ok(s.burrow(2, &["disconnect"]));
        s.assert_restored("default", "echo", &echo_before);
        s.reroute(1, &["echo", "--port", "8080:3000"]);
        s.reroute(1, &["redis", "-n", "data", "--port", "6379:6390"]);
        let kc = c.kubeconfig();
        let out = ok(s.burrow_with(1, Some(&kc), &["uninstall"]));
        assert!(
            out.contains("restoring rerouted Service default/echo"),
            "{out}"
        );
        s.assert_restored("default", "echo", &echo_before);
        s.assert_restored("data", "redis", &redis_before);
        let _ = run(s.burrow(1, &["disconnect"]));
        assert_eq!(s.pods(), pods_before, "pods were restarted or replaced");
    });

    for child in &mut servers {
        let _ = child.kill();
        let _ = child.wait();
    }
    points.finish();
}
