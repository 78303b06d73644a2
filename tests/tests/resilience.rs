//! Sleep, network changes and faults (issue 17, points 3 and 4), with the
//! real `burrow` and `burrow-gateway` in a miniature cluster.
//!
//! Each point has a laptop of its own in one shared cluster, so the long
//! waits (4 minutes of a stopped daemon or a link down) run at the same
//! time: run this binary with `--test-threads` of at least the number of
//! tests (`scripts/test.sh` gives it 12; the file is `test = false`, out
//! of the plain `cargo test`). The points that change the cluster itself
//! (a gateway with a short grace, an API server restart, the gateway pod
//! deleted) share a second, small cluster, one after the other. The whole
//! file takes about 4.5 minutes (the 4-minute waits run side by side).
//!
//! A "long connection" is `mc-flows line-echo` to the `db` pod (socat and
//! `cat`: no idle timeout of its own, unlike nginx's 75 s keep-alive): a
//! numbered line every second on one TCP connection, each awaited. It must
//! go on after the laptop is back, on the same connection, within
//! [`RESUME_WITHIN`] (two more answers, a second apart). Its TCP got no
//! ACKs meanwhile and would back off (retransmissions up to 120 s apart);
//! burrow keeps that from delaying the return: a stopped daemon finds the
//! latest retransmission in the TUN queue, a session that expired sends
//! what it queued once the handshake is done, and while the network is
//! gone the data path answers "host unreachable", which undoes the backoff
//! (RFC 6069). The tunnel answering new connections (`curl http://web`)
//! within 5 s is checked on its own.
//!
//! The faults over port-forward come during a 100 MiB download at 10 MB/s.
//! After a cut stream or an API server restart the gateway still holds the
//! download's flow, so the download going on must complete, whole and
//! right (a hung one fails with the laptop's `ss -tin`, the daemon's and
//! the gateway's logs), and a new one must too. A deleted gateway pod takes
//! its flows with it: there only the new download must succeed.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::Value;

/// The laptops of the shared cluster, one per point.
const LAPTOPS: usize = 9;
/// How long a laptop sleeps (or is offline) in the long points.
const SLEEP: Duration = Duration::from_secs(240);
/// The bound on "the tunnel is back": acceptance says within 5 s.
const BACK_WITHIN: Duration = Duration::from_secs(5);
/// The long connection answers twice more within this of the laptop
/// being back: resumed within 5 s, plus two answers a second apart, plus
/// margin (measured: 1.7-3.1 s).
const RESUME_WITHIN: Duration = Duration::from_secs(10);
/// The long connection's echo server (the `db` pod's socat + cat).
const LINE_ECHO: &str = "db-0.db.data.svc.cluster.local:5432";

/// One connect at a time (the first installs the gateway).
static CONNECTING: Mutex<()> = Mutex::new(());

fn rs() -> Option<SharedCluster> {
    shared_cluster("rs", LAPTOPS)
}

/// Laptop `n` of `c` connected with `transport` and `extra` flags.
fn connected<'a>(c: &'a Cluster, n: usize, transport: &str, extra: &[&str]) -> Laptop<'a> {
    let l = Laptop::new(c, n, c.state_dir().join(format!("burrow-run-rs{n}")));
    let _one = CONNECTING.lock().unwrap_or_else(|p| p.into_inner());
    if !l.connected() {
        let mut args = vec!["--transport", transport];
        args.extend_from_slice(extra);
        l.connect_ok(&args);
    }
    let st = l.status_json();
    assert_eq!(st["transport"], transport, "{st}");
    l
}

/// What must not change across a sleep: the tunnel address, routes, DNS
/// (its mode and stub; not its cache counters).
fn identity(st: &Value) -> (Value, Value, String, Value) {
    let dns = st["dns"].as_str().unwrap_or_default();
    let dns = dns.split(" (cache").next().unwrap_or_default().to_string();
    (
        st["tunnel_address"].clone(),
        st["routes"].clone(),
        dns,
        st["dns_servers"].clone(),
    )
}

/// The daemon's pid (`burrow ... daemon` in the laptop's namespace).
fn daemon_pid(l: &Laptop) -> i32 {
    let run_dir = l.run_dir().display().to_string();
    l.processes()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(" daemon") && cmd.contains(&run_dir))
        .map(|(pid, _)| pid.parse().expect("pid"))
        .unwrap_or_else(|| panic!("no burrow daemon in laptop {}", l.n))
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// The long connection: `mc-flows line-echo` in the laptop, its output in
/// a file.
struct LongConnection {
    child: Child,
    out: PathBuf,
}

impl LongConnection {
    fn start(l: &Laptop) -> Self {
        let out = l.run_dir().join("line-echo.out");
        let file = std::fs::File::create(&out).expect("line-echo output");
        let mc_flows = bin_dir().join("mc-flows");
        let child = l
            .on(&[
                mc_flows.to_str().expect("utf-8 path"),
                "line-echo",
                "--to",
                LINE_ECHO,
            ])
            .stdout(Stdio::from(file))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn line-echo");
        let lc = Self { child, out };
        lc.answers_after(Instant::now(), 3, Duration::from_secs(30));
        lc
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Answers so far (numbers).
    fn answered(&self) -> u64 {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("@@ "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn assert_alive(&self) {
        let text = self.text();
        assert!(!text.contains("!!"), "the long connection failed:\n{text}");
    }

    /// Waits (at most `limit`) until `more` answers came after `since`'s
    /// count; how long it took.
    fn answers_after(&self, since: Instant, more: u64, limit: Duration) -> Duration {
        let base = self.answered();
        eventually(limit, "the long connection to answer again", || {
            self.assert_alive();
            (self.answered() >= base + more).then_some(())
        });
        since.elapsed()
    }
}

impl Drop for LongConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `curl http://web/` answers from the laptop (2 s at most).
fn web_answers(l: &Laptop) -> bool {
    run(l.on(&[
        "curl",
        "-sSf",
        "--max-time",
        "2",
        "-o",
        "/dev/null",
        "http://web/",
    ]))
    .status
    .success()
}

/// How long after `since` a `curl http://web/` first answered: the start
/// of the attempt that succeeded (polled every 100 ms), so the curl's own
/// time is not counted. Fails past `limit`.
fn back_after(l: &Laptop, since: Instant, limit: Duration) -> Duration {
    loop {
        let attempt = Instant::now();
        if web_answers(l) {
            return attempt.duration_since(since);
        }
        assert!(
            since.elapsed() < limit,
            "the tunnel of laptop {} was not back within {limit:?}:\nstatus: {}\ndaemon log:\n{}",
            l.n,
            ok(l.burrow(&["status"])),
            l.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After the laptop is back: the tunnel answers within [`BACK_WITHIN`],
/// the long connection goes on, the identity is the one it had.
fn assert_back(l: &Laptop, long: &LongConnection, since: Instant, before: &Value, what: &str) {
    let back = back_after(l, since, Duration::from_secs(60));
    let resumed = long.answers_after(since, 2, RESUME_WITHIN);
    let st = l.status_json();
    eprintln!(
        "{what} (laptop {}): curl http://web answered {back:.1?} after, the long connection went on {resumed:.1?} after; events: {}",
        l.n, st["events"]
    );
    // Polled every 100 ms from the start of each attempt: the bound holds
    // for the first attempt that got through.
    assert!(
        back <= BACK_WITHIN,
        "{what}: the tunnel of laptop {} came back {back:?} after, not within {BACK_WITHIN:?}:\n{st}\ndaemon log:\n{}",
        l.n,
        l.daemon_log()
    );
    assert_eq!(
        identity(&st),
        identity(before),
        "{what}: the laptop's tunnel address, routes or DNS changed"
    );
    long.assert_alive();
}

/// SIGSTOP of the daemon for [`SLEEP`], then SIGCONT.
fn sleeps(l: &Laptop, what: &str) {
    let before = l.status_json();
    let long = LongConnection::start(l);
    let pid = daemon_pid(l);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(SLEEP);
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let woke = Instant::now();
    assert_back(l, &long, woke, &before, what);
    let st = l.status_json();
    assert!(
        st["events"].to_string().contains("woke up"),
        "{what}: status does not say the laptop slept: {st}"
    );
}

/// The laptop's underlay link down for [`SLEEP`], then up.
fn goes_offline(l: &Laptop, what: &str) {
    let before = l.status_json();
    let long = LongConnection::start(l);
    l.c.set_laptop_link(&l.name(), false).expect("link down");
    let down = Instant::now();
    // Meanwhile a new connection into the cluster fails at once (curl's
    // exit code 7, "Couldn't connect to server": the host is unreachable)
    // instead of hanging until curl gives up (28).
    let web = jsonpath(l.c, &["get", "svc", "web"], "{.spec.clusterIP}");
    let url = format!("http://{web}/");
    eventually(
        Duration::from_secs(20),
        "a connection refused as unreachable while offline",
        || {
            let o = run(l.on(&["curl", "-sS", "--max-time", "8", &url]));
            (o.status.code() == Some(7)).then_some(())
        },
    );
    std::thread::sleep(SLEEP.saturating_sub(down.elapsed()));
    l.c.set_laptop_link(&l.name(), true).expect("link up");
    let up = Instant::now();
    assert_back(l, &long, up, &before, what);
    let st = l.status_json();
    assert!(
        st["events"].to_string().contains("network back"),
        "{what}: status does not say the network went and came back: {st}"
    );
}

/// The laptop's underlay address changes (192.168.240.(1+n) → .(128+n)).
fn moves(l: &Laptop, what: &str) {
    let before = l.status_json();
    let long = LongConnection::start(l);
    let to = std::net::Ipv4Addr::new(192, 168, 240, (128 + l.n) as u8);
    l.c.set_laptop_address(&l.name(), to).expect("new address");
    let moved = Instant::now();
    assert_back(l, &long, moved, &before, what);
    let st = l.status_json();
    assert!(
        st["events"].to_string().contains("network changed"),
        "{what}: status does not say the network changed: {st}"
    );
}

#[test]
fn sleep_over_udp() {
    let Some(ref c) = rs() else { return };
    sleeps(&connected(c, 1, "udp", &[]), "daemon stopped 4 min, UDP");
}

#[test]
fn offline_over_udp() {
    let Some(ref c) = rs() else { return };
    goes_offline(&connected(c, 2, "udp", &[]), "link down 4 min, UDP");
}

#[test]
fn new_address_over_udp() {
    let Some(ref c) = rs() else { return };
    moves(&connected(c, 3, "udp", &[]), "new underlay address, UDP");
}

#[test]
fn sleep_over_port_forward() {
    let Some(ref c) = rs() else { return };
    sleeps(
        &connected(c, 4, "port-forward", &[]),
        "daemon stopped 4 min, port-forward",
    );
}

#[test]
fn offline_over_port_forward() {
    let Some(ref c) = rs() else { return };
    goes_offline(
        &connected(c, 5, "port-forward", &[]),
        "link down 4 min, port-forward",
    );
}

#[test]
fn new_address_over_port_forward() {
    let Some(ref c) = rs() else { return };
    moves(
        &connected(c, 6, "port-forward", &[]),
        "new underlay address, port-forward",
    );
}

// ------------------------------------------------------------ stream cut

/// Resets every TCP connection the laptop has open to the API server, both
/// ways, and keeps them refused for a moment (iptables REJECT with
/// tcp-reset on their ports): the port-forward streams, watches and pooled
/// connections break; new ones are not touched. The REJECT's own resets
/// were not taken by either end here (a bulk stream's both ends stayed
/// established, their RSTs presumably failing RFC 5961's exact-sequence
/// check), so the laptop's sockets are also destroyed (`ss -K`: the local
/// end aborts, the API server gets a RST), which is what a middlebox's
/// reset does to a connection.
fn cut_api_connections(l: &Laptop) -> usize {
    let out = l.ok(&["ss", "-Htn", "state", "established", "( dport = :6443 )"]);
    let ports: Vec<String> = out
        .lines()
        .filter_map(|line| {
            let local = line.split_whitespace().nth(2)?;
            Some(local.rsplit_once(':')?.1.to_string())
        })
        .collect();
    let rule = |op: &str, port: &str| {
        l.ok(&[
            "iptables",
            "-w",
            op,
            "OUTPUT",
            "-p",
            "tcp",
            "--sport",
            port,
            "--dport",
            "6443",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]);
        l.ok(&[
            "iptables",
            "-w",
            op,
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            port,
            "--sport",
            "6443",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]);
    };
    for p in &ports {
        rule("-I", p);
    }
    for p in &ports {
        // It may say "Invalid argument" for a socket gone meanwhile.
        let _ = run(l.on(&[
            "ss",
            "-K",
            "dst",
            "192.168.240.1",
            "sport",
            "=",
            &format!(":{p}"),
        ]));
    }
    // Long enough for a segment each way (the streams carry a download).
    std::thread::sleep(Duration::from_secs(2));
    for p in &ports {
        rule("-D", p);
    }
    ports.len()
}

/// `curl` of the web root's 100 MiB file into the laptop's run dir at
/// `rate` (so that it is still going when the fault comes), in the
/// background.
fn start_download(l: &Laptop, name: &str, rate: &str) -> (Child, PathBuf) {
    let file = l.run_dir().join(name);
    let child = l
        .on(&[
            "curl",
            "-sS",
            "--max-time",
            "300",
            "--limit-rate",
            rate,
            "-o",
            file.to_str().expect("utf-8 path"),
            "-w",
            "%{size_download}",
            "http://web/100m.bin",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn curl");
    (child, file)
}

/// The sha256 the web root lists for `file`.
fn expected_sha256(c: &Cluster, file: &str) -> String {
    let sums = std::fs::read_to_string(c.state_dir().join("www/SHA256SUMS"))
        .expect("the web root's SHA256SUMS");
    sums.lines()
        .find_map(|l| {
            let (sum, name) = l.split_once("  ")?;
            (name == file).then(|| sum.to_string())
        })
        .unwrap_or_else(|| panic!("{file} not in SHA256SUMS:\n{sums}"))
}

/// A new 100 MiB download, whole and right.
fn download_is_right(l: &Laptop, what: &str) {
    let (child, file) = start_download(l, "after.bin", "1000M");
    let o = child.wait_with_output().expect("curl");
    assert!(
        o.status.success(),
        "{what}: a new download failed: {}\ndaemon log:\n{}",
        stderr(&o),
        l.daemon_log()
    );
    is_100m(l, &file, &format!("{what}: a new download"));
}

/// `file` is the web root's 100m.bin, byte for byte (sha256); removed.
fn is_100m(l: &Laptop, file: &PathBuf, what: &str) {
    let mut sha = Command::new("sha256sum");
    sha.arg(file);
    let sum = ok(sha);
    let _ = std::fs::remove_file(file);
    assert_eq!(
        sum.split_whitespace().next(),
        Some(expected_sha256(l.c, "100m.bin").as_str()),
        "{what}: sha256"
    );
}

/// What a download that failed or stalled leaves to read: the laptop's
/// TCP sockets towards port 80 (`ss -tin`), the daemon's log, the
/// gateway's log and its metrics that are not zero.
fn stall_evidence(l: &Laptop) -> String {
    let ss = run(l.on(&["ss", "-tinoe", "( dport = :80 )"]));
    let daemon = burrow_tests::cluster::tail(&l.run_dir().join("daemon.log"), 200);
    let gateway = gateway_log(l.c, 200);
    let ips = stdout(&run(kubectl(
        l.c,
        &[
            "-n",
            "burrow-system",
            "get",
            "pods",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ],
    )));
    let mut metrics = String::new();
    for ip in ips.split_whitespace() {
        let url = format!("http://{ip}:9090/metrics");
        let o = run(l.c.exec("node", &["curl", "-sS", "--max-time", "5", &url]));
        metrics.push_str(&format!("{url}: {}\n", stderr(&o).trim()));
        for line in stdout(&o).lines() {
            if line.starts_with("burrow_gateway_") && !line.ends_with(" 0") {
                metrics.push_str(line);
                metrics.push('\n');
            }
        }
    }
    format!(
        "ss -tin in laptop {}:\n{}{}\ndaemon log:\n{daemon}\ngateway log:\n{gateway}\ngateway metrics (not zero):\n{metrics}",
        l.n,
        stdout(&ss),
        stderr(&ss),
    )
}

/// No byte of the download going on for this long: it hangs for good.
/// Longer than smoltcp's largest retransmission timeout (60 s), so a
/// sender backed off to it still counts as alive.
const DOWNLOAD_STALL: Duration = Duration::from_secs(75);

/// The download that was going on when the fault came completes, whole and
/// right (its connection resumed once the transport was back: issue 17).
/// Fails as soon as it makes no progress for [`DOWNLOAD_STALL`], with what
/// the laptop's TCP, the daemon and the gateway say; returns how long it
/// took after `since`.
fn download_going_on_completes(
    l: &Laptop,
    mut child: Child,
    file: &PathBuf,
    since: Instant,
    what: &str,
) -> Duration {
    let size = || std::fs::metadata(file).map_or(0, |m| m.len());
    let (mut last, mut moved) = (size(), Instant::now());
    // The laptop's sockets 10 s into a stall, while the connection is
    // still there to be seen (curl may end it later).
    let mut stalled = String::new();
    let status = loop {
        if let Some(status) = child.try_wait().expect("curl") {
            break status;
        }
        let bytes = size();
        if bytes != last {
            (last, moved) = (bytes, Instant::now());
        } else if stalled.is_empty() && moved.elapsed() > Duration::from_secs(10) {
            let ss = run(l.on(&["ss", "-tinoe", "( dport = :80 )"]));
            stalled = format!(
                "ss -tin {:?} into a stall at {last} bytes:\n{}",
                moved.elapsed(),
                stdout(&ss)
            );
        }
        if moved.elapsed() > DOWNLOAD_STALL {
            let evidence = stall_evidence(l);
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(file);
            panic!(
                "{what}: the download going on stalled at {last} bytes (nothing for {DOWNLOAD_STALL:?}):\n{stalled}{evidence}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = since.elapsed();
    let o = child.wait_with_output().expect("curl");
    if !status.success() {
        let evidence = stall_evidence(l);
        let _ = std::fs::remove_file(file);
        panic!(
            "{what}: the download going on failed ({status}) at {} bytes: {}\n{stalled}{evidence}",
            size(),
            stderr(&o).trim()
        );
    }
    is_100m(l, file, &format!("{what}: the download going on"));
    took
}

/// How the download that was going on when the fault came ended (where
/// it may fail: a new gateway pod does not know its flow).
fn outcome(child: Child, file: &PathBuf) -> String {
    let o = child.wait_with_output().expect("curl");
    let _ = std::fs::remove_file(file);
    if o.status.success() {
        format!("completed ({} bytes)", stdout(&o))
    } else {
        format!("failed: {}", stderr(&o).trim())
    }
}

#[test]
fn port_forward_stream_cut() {
    let Some(ref c) = rs() else { return };
    let l = connected(c, 7, "port-forward", &[]);
    let what = "port-forward stream cut during a download";
    let before = l.status_json();
    let reconnects = before["reconnects"].as_u64().unwrap_or(0);
    // 100 MiB at 10 MB/s: ~10 s, cut after 3.
    let (download, file) = start_download(&l, "during.bin", "10M");
    std::thread::sleep(Duration::from_secs(3));
    let cut = Instant::now();
    let n = cut_api_connections(&l);
    assert!(n > 0, "no connection to the API server to cut");
    let back = back_after(&l, cut, Duration::from_secs(60));
    let st = l.status_json();
    // The gateway keeps the flow: only the streams broke.
    let done = download_going_on_completes(&l, download, &file, cut, what);
    eprintln!(
        "{what}: {n} connections cut; curl http://web answered {back:.1?} after the cut; the download going on completed {done:.1?} after it; status: reconnects {}, {}",
        st["reconnects"], st["last_reconnect_error"]
    );
    // The cut lasts 2 s of the bound (the rules stay that long).
    assert!(
        back <= BACK_WITHIN + Duration::from_secs(2),
        "{what}: back {back:?} after the cut:\n{st}\n{}",
        l.daemon_log()
    );
    assert!(
        st["reconnects"].as_u64().unwrap_or(0) > reconnects,
        "{what}: status does not say the transport reconnected: {st}"
    );
    assert_eq!(identity(&st), identity(&before));
    download_is_right(&l, what);
}

#[test]
fn port_forward_cut_leaves_udp_transport_alone() {
    let Some(ref c) = rs() else { return };
    let l = connected(c, 8, "udp", &[]);
    let long = LongConnection::start(&l);
    let cut = Instant::now();
    let n = cut_api_connections(&l);
    // Answers go on every second: three more within a few seconds of the
    // cut, on the same connection.
    let took = long.answers_after(cut, 3, Duration::from_secs(10));
    eprintln!(
        "UDP transport, API connections cut ({n}): the long connection went on ({took:.1?} for 3 answers)"
    );
    assert!(web_answers(&l));
}

// ----------------------------------------- the second cluster: grace, API

/// A second, small cluster whose gateway has a short grace
/// (`--peer-grace 20s`), for the points that change the cluster; one point
/// at a time.
static SECOND: Mutex<Option<Cluster>> = Mutex::new(None);
const GRACE: &str = "20s";

fn second() -> Option<std::sync::MutexGuard<'static, Option<Cluster>>> {
    let mut guard = SECOND.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        let c = common::cluster("rsg", 2)?;
        // SAFETY: registers a plain function; it runs once, at exit.
        unsafe {
            libc::atexit(take_second_down);
        }
        install_with_short_grace(&c);
        *guard = Some(c);
    }
    Some(guard)
}

extern "C" fn take_second_down() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(c) = SECOND.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(c);
        }
    });
}

/// `burrow install`, then the gateway's Deployment given `--peer-grace`
/// (and debug logs: each flow's story, for a failure to show); returns
/// once its one pod runs with it.
fn install_with_short_grace(c: &Cluster) {
    let l = Laptop::new(c, 1, c.state_dir().join("burrow-run-rsg1"));
    let kc = c.kubeconfig().display().to_string();
    ok(l.burrow(&["install", "--kubeconfig", &kc]));
    let patch = format!(
        r#"[{{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--peer-grace={GRACE}"}},
           {{"op":"add","path":"/spec/template/spec/containers/0/env/-","value":{{"name":"RUST_LOG","value":"info,burrow_gateway=debug"}}}}]"#
    );
    ok(kubectl(
        c,
        &[
            "-n",
            "burrow-system",
            "patch",
            "deployment",
            "burrow-gateway",
            "--type",
            "json",
            "-p",
            &patch,
        ],
    ));
    eventually(
        Duration::from_secs(60),
        "the gateway's one pod running with --peer-grace",
        || {
            let out = stdout(&run(kubectl(
                c,
                &["-n", "burrow-system", "get", "pods", "-o", "json"],
            )));
            let pods: Value = serde_json::from_str(&out).ok()?;
            let items = pods["items"].as_array()?;
            let ready = |p: &Value| {
                p["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            };
            (items.len() == 1
                && items[0]["spec"]["containers"][0]["args"]
                    .to_string()
                    .contains("--peer-grace")
                && ready(&items[0]))
            .then_some(())
        },
    );
}

#[test]
fn sleep_longer_than_the_grace() {
    let Some(guard) = second() else { return };
    let c = guard.as_ref().expect("second cluster");
    let l = connected(c, 1, "udp", &[]);
    let what = "daemon stopped longer than the gateway's grace";
    let before = l.status_json();
    // A download that only waits for data (100 MiB at 1 MB/s): the
    // gateway forgets its flow, and it must end, not wait for good.
    let (mut download, file) = start_download(&l, "forgotten.bin", "1M");
    std::thread::sleep(Duration::from_secs(2));
    let pid = daemon_pid(&l);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    // The grace (20 s), the reaper's tick (5 s) and margin.
    std::thread::sleep(Duration::from_secs(40));
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let woke = Instant::now();
    let back = back_after(&l, woke, Duration::from_secs(60));
    let st = l.status_json();
    eprintln!(
        "{what}: curl http://web answered {back:.1?} after SIGCONT; events: {}",
        st["events"]
    );
    assert!(
        back <= BACK_WITHIN,
        "{what}: back {back:?} after:\n{st}\n{}",
        l.daemon_log()
    );
    assert!(
        st["events"].to_string().contains("had forgotten"),
        "{what}: status does not say the gateway had forgotten the laptop: {st}"
    );
    assert_eq!(identity(&st), identity(&before));
    let ended = eventually(
        Duration::from_secs(20),
        "the download the gateway forgot to end",
        || download.try_wait().ok().flatten(),
    );
    let _ = std::fs::remove_file(&file);
    assert!(
        !ended.success(),
        "{what}: a download of 100 MiB at 1 MB/s cannot have completed: {ended}"
    );
    eprintln!(
        "{what}: the forgotten download ended {:.1?} after SIGCONT ({ended})",
        woke.elapsed()
    );
}

#[test]
fn api_server_restart_over_port_forward() {
    let Some(guard) = second() else { return };
    let c = guard.as_ref().expect("second cluster");
    let l = connected(c, 2, "port-forward", &[]);
    let what = "API server restarted during a download";
    let before = l.status_json();
    let (download, file) = start_download(&l, "during.bin", "10M");
    std::thread::sleep(Duration::from_secs(3));
    c.set_api_server(false).expect("stop the API server");
    std::thread::sleep(Duration::from_secs(3));
    c.set_api_server(true).expect("start the API server");
    let started = Instant::now();
    let back = back_after(&l, started, Duration::from_secs(60));
    let st = l.status_json();
    let done = download_going_on_completes(&l, download, &file, started, what);
    eprintln!(
        "{what}: curl http://web answered {back:.1?} after it was back; the download going on completed {done:.1?} after; status: reconnects {}, {}; events: {}",
        st["reconnects"], st["last_reconnect_error"], st["events"]
    );
    assert!(
        back <= BACK_WITHIN,
        "{what}: back {back:?} after:\n{st}\n{}",
        l.daemon_log()
    );
    assert!(
        st["reconnects"].as_u64().unwrap_or(0) > before["reconnects"].as_u64().unwrap_or(0),
        "{what}: status does not say the transport reconnected: {st}"
    );
    assert_eq!(identity(&st), identity(&before));
    download_is_right(&l, what);
}

/// The name of the gateway's Ready pod in the second cluster, if one is.
fn ready_gateway(c: &Cluster) -> Option<String> {
    let out = stdout(&run(kubectl(
        c,
        &["-n", "burrow-system", "get", "pods", "-o", "json"],
    )));
    let pods: Value = serde_json::from_str(&out).ok()?;
    pods["items"].as_array()?.iter().find_map(|p| {
        let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        let deleting = !p["metadata"]["deletionTimestamp"].is_null();
        (ready && !deleting).then(|| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
    })
}

#[test]
fn gateway_pod_deleted_over_port_forward() {
    let Some(guard) = second() else { return };
    let c = guard.as_ref().expect("second cluster");
    let l = connected(c, 2, "port-forward", &[]);
    let what = "gateway pod deleted during a download";
    let before = l.status_json();
    let old = ready_gateway(c).expect("a ready gateway pod");
    let (download, file) = start_download(&l, "during.bin", "10M");
    std::thread::sleep(Duration::from_secs(3));
    ok(kubectl(
        c,
        &["-n", "burrow-system", "delete", "pod", &old, "--wait=false"],
    ));
    let new = eventually(Duration::from_secs(60), "a new gateway pod ready", || {
        ready_gateway(c).filter(|p| *p != old)
    });
    let ready = Instant::now();
    let back = back_after(&l, ready, Duration::from_secs(60));
    let st = l.status_json();
    eprintln!(
        "{what}: {old} → {new}; curl http://web answered {back:.1?} after the new pod was ready; the download going on {}; events: {}",
        outcome(download, &file),
        st["events"]
    );
    assert!(
        back <= BACK_WITHIN,
        "{what}: back {back:?} after:\n{st}\n{}",
        l.daemon_log()
    );
    assert!(
        st["events"].to_string().contains("replaced by"),
        "{what}: status does not say the gateway pod changed: {st}"
    );
    assert!(
        st["endpoint"].as_str().is_some_and(|e| e.contains(&new)),
        "{what}: status does not name the new pod as the transport's end: {st}"
    );
    assert_eq!(identity(&st), identity(&before));
    download_is_right(&l, what);
}
