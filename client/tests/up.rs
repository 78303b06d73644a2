//! `burrow up --wg-config` and `burrow down` end to end: the real `burrow`
//! binary in a network namespace of its own ("laptop"), the real
//! `burrow-gateway` in a second one ("gateway") joined to it by a veth
//! pair, and a TCP echo server on a third address inside the gateway's
//! namespace that only the tunnel reaches.
//!
//! ```text
//!  laptop ns                                gateway ns
//!  burrow0 100.64.0.2 ── ul0 172.31.250.1 ══ ul1 172.31.250.2 ── burrow-gateway
//!  route 10.77.0.0/24 dev burrow0                              echo on 10.77.0.10:7777 (lo)
//! ```
//!
//! Needs root and `ip` (iproute2); runs only with BURROW_E2E=1 and says why
//! it skips otherwise. Every namespace is created here and deleted on drop,
//! also when a test panics; nothing touches the machine's own network.
//! `burrow-gateway` is built with cargo if it is not next to `burrow`.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_netstack::wgconf::encode_key;

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");
const ROUTE: &str = "10.77.0.0/24";
const ECHO: &str = "10.77.0.10:7777";
const GATEWAY_UNDERLAY: &str = "172.31.250.2";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether to run; panics if BURROW_E2E=1 demands a run that cannot be.
fn e2e() -> bool {
    if std::env::var("BURROW_E2E").as_deref() != Ok("1") {
        eprintln!("skipped: set BURROW_E2E=1 to run (needs root, iproute2 and network namespaces)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "BURROW_E2E=1 but not root: these tests create network namespaces and TUN devices"
    );
    true
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(Command::new("ip").args(args)).stdout).into_owned()
}

/// `burrow-gateway`, next to `burrow` in the target directory (`cargo test
/// -p burrow -p burrow-gateway` builds both). Built here with cargo, once per
/// test binary, if it is missing or older than its sources.
fn gateway_binary() -> &'static Path {
    static GATEWAY: OnceLock<PathBuf> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let burrow = Path::new(BURROW);
        let profile_dir = burrow.parent().expect("burrow is in a directory");
        let target_dir = profile_dir.parent().expect("profile is in the target dir");
        let gateway = profile_dir.join("burrow-gateway");
        let built = fs::metadata(&gateway).and_then(|m| m.modified()).ok();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace");
        let sources = [
            "gateway/src",
            "gateway/Cargo.toml",
            "netstack/src",
            "netstack/Cargo.toml",
        ]
        .iter()
        .filter_map(|p| newest(&workspace.join(p)))
        .max();
        if let (Some(built), Some(sources)) = (built, sources)
            && built >= sources
        {
            return gateway;
        }
        eprintln!("building burrow-gateway (missing or older than its sources)");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "burrow-gateway", "--bin", "burrow-gateway"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cannot run cargo to build burrow-gateway");
        assert!(status.success(), "cargo build -p burrow-gateway failed");
        assert!(gateway.exists(), "no {}", gateway.display());
        gateway
    })
}

/// The newest modification time of a file, or of any file below a
/// directory.
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|e| newest(&e.path()))
        .max()
}

fn secret() -> StaticSecret {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    StaticSecret::from(bytes)
}

fn public(s: &StaticSecret) -> String {
    encode_key(PublicKey::from(s).as_bytes())
}

/// Run `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = fs::File::open(&path).expect("namespace file");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// An echo server on `ECHO` in the gateway namespace; stops on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &str) -> Self {
        let listener = in_netns(ns, || TcpListener::bind(ECHO).expect("bind echo server"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(TIMEOUT));
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Two namespaces, a gateway and a laptop config; everything removed on
/// drop.
struct Net {
    laptop: String,
    gateway: String,
    dir: tempfile::TempDir,
    gateway_proc: Option<Child>,
    children: Vec<Child>,
    _echo: Option<Echo>,
}

impl Net {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "bt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            laptop: format!("{id}-l"),
            gateway: format!("{id}-g"),
            dir: tempfile::tempdir().expect("tempdir"),
            gateway_proc: None,
            children: Vec::new(),
            _echo: None,
        };
        let (l, g) = (net.laptop.clone(), net.gateway.clone());
        ip(&["netns", "add", &l]);
        ip(&["netns", "add", &g]);
        ip(&[
            "-n", &l, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns", &g,
        ]);
        ip(&["-n", &l, "addr", "add", "172.31.250.1/24", "dev", "ul0"]);
        ip(&["-n", &l, "link", "set", "ul0", "up"]);
        ip(&["-n", &l, "link", "set", "lo", "up"]);
        ip(&["-n", &g, "addr", "add", "172.31.250.2/24", "dev", "ul1"]);
        ip(&["-n", &g, "link", "set", "ul1", "up"]);
        ip(&["-n", &g, "link", "set", "lo", "up"]);
        ip(&["-n", &g, "addr", "add", "10.77.0.10/32", "dev", "lo"]);
        net
    }

    /// `new` plus a running gateway and echo server, and the laptop's
    /// config at `laptop.conf`.
    fn with_gateway() -> Self {
        let mut net = Self::new();
        let (gw, laptop) = (secret(), secret());
        net.write(
            "gw.conf",
            &format!(
                "[Interface]\nPrivateKey = {}\n[Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.2/32\n",
                encode_key(&gw.to_bytes()),
                public(&laptop)
            ),
        );
        net.write(
            "laptop.conf",
            &format!(
                // The /24 address makes the kernel add 100.64.0.0/24 dev
                // burrow0 itself, before `up` adds the same route.
                "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.2/24\nDNS = 10.96.0.10\n\n\
                 [Peer]\nPublicKey = {}\nEndpoint = {GATEWAY_UNDERLAY}:51820\n\
                 AllowedIPs = {ROUTE}, 100.64.0.0/24\nPersistentKeepalive = 25\n",
                encode_key(&laptop.to_bytes()),
                public(&gw)
            ),
        );
        let log = net.path("gateway.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.gateway])
            .arg(gateway_binary())
            .arg("--config")
            .arg(net.path("gw.conf"))
            .args(["--listen", "0.0.0.0"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("gateway log"))
            .spawn()
            .expect("start burrow-gateway");
        net.gateway_proc = Some(child);
        wait_for(
            || {
                fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("burrow-gateway serving")
            },
            "burrow-gateway to listen",
        );
        net._echo = Some(Echo::start(&net.gateway));
        net
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).expect("write file");
        p
    }

    fn run_dir(&self) -> PathBuf {
        self.path("run")
    }

    fn state_file(&self) -> PathBuf {
        self.run_dir().join("up-burrow0.json")
    }

    /// `burrow ARGS` in the laptop namespace.
    fn burrow(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.laptop, BURROW])
            .args(args)
            .env("BURROW_RUN_DIR", self.run_dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    /// Run `burrow ARGS` to completion.
    fn burrow_output(&self, args: &[&str]) -> (bool, String) {
        let out = self.burrow(args).output().expect("run burrow");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `burrow up --wg-config laptop.conf` in the foreground, its output in
    /// `log`; returns once the tunnel is ready.
    fn up_foreground(&mut self, log: &str) -> u32 {
        self.up_foreground_with(log, &[])
    }

    /// The same with `flags` before `--wg-config`.
    fn up_foreground_with(&mut self, log: &str, flags: &[&str]) -> u32 {
        let log = fs::File::create(self.path(log)).expect("log");
        let conf = self.path("laptop.conf");
        let conf = conf.to_string_lossy();
        let mut args = vec!["up"];
        args.extend_from_slice(flags);
        args.extend(["--wg-config", &conf]);
        let child = self
            .burrow(&args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start burrow up");
        let pid = child.id();
        self.children.push(child);
        self.wait_ready(pid);
        pid
    }

    fn state(&self) -> Option<serde_json::Value> {
        let text = fs::read(self.state_file()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn wait_ready(&mut self, pid: u32) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.state()
                && s["pid"] == pid
                && s["ready"] == true
            {
                return;
            }
            for c in &mut self.children {
                if c.id() == pid
                    && let Ok(Some(status)) = c.try_wait()
                {
                    panic!("burrow up exited early ({status}): {}", self.logs());
                }
            }
            assert!(
                Instant::now() < deadline,
                "burrow up not ready: {}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                all += &format!(
                    "\n--- {}\n{}",
                    p.display(),
                    fs::read_to_string(&p).unwrap_or_default()
                );
            }
        }
        all
    }

    /// A TCP round trip from the laptop namespace to the echo server.
    fn echo_through_tunnel(&self) -> String {
        in_netns(&self.laptop, || {
            let addr: SocketAddr = ECHO.parse().expect("addr");
            let mut s =
                TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect through the tunnel");
            s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            s.write_all(b"hello through burrow").expect("write");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).expect("read echo");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    }

    fn device_exists(&self) -> bool {
        Command::new("ip")
            .args(["-n", &self.laptop, "link", "show", "burrow0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("ip")
            .success()
    }

    fn routes(&self) -> String {
        ip(&["-n", &self.laptop, "route", "show"])
    }

    /// No device, no route through it, no state file.
    fn assert_clean(&self) {
        assert!(!self.device_exists(), "burrow0 left behind");
        let routes = self.routes();
        assert!(!routes.contains(ROUTE), "route left behind:\n{routes}");
        assert!(
            !self.state_file().exists(),
            "state file left behind: {}",
            fs::read_to_string(self.state_file()).unwrap_or_default()
        );
    }

    fn signal(&self, pid: u32, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("kill");
    }

    /// Wait until `pid` has exited (a zombie counts: it holds nothing).
    fn wait_exit(&mut self, pid: u32) {
        if let Some(c) = self.children.iter_mut().find(|c| c.id() == pid) {
            let deadline = Instant::now() + TIMEOUT;
            while c.try_wait().expect("wait").is_none() {
                assert!(Instant::now() < deadline, "pid {pid} did not exit");
                thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        wait_for(
            || {
                fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        s.rsplit_once(')')
                            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(true)
            },
            "the process to exit",
        );
    }

    fn pid_in_state(&self) -> u32 {
        let s = self.state().expect("state file");
        s["pid"].as_u64().expect("pid") as u32
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.laptop, &self.gateway] {
            // Everything still running in them: daemons, the gateway.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        for c in self.children.iter_mut().chain(self.gateway_proc.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self._echo = None;
        for ns in [&self.laptop, &self.gateway] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_through_the_tunnel_and_sigterm_leaves_nothing() {
    if !e2e() {
        return;
    }
    let mut net = Net::with_gateway();
    let pid = net.up_foreground("up.log");
    assert!(net.device_exists());
    assert!(
        net.routes().contains(&format!("{ROUTE} dev burrow0")),
        "{}",
        net.routes()
    );
    assert_eq!(net.echo_through_tunnel(), "hello through burrow");
    // A second flow on the established session.
    assert_eq!(net.echo_through_tunnel(), "hello through burrow");

    net.signal(pid, nix::sys::signal::Signal::SIGTERM);
    net.wait_exit(pid);
    let status = net
        .children
        .iter_mut()
        .find(|c| c.id() == pid)
        .and_then(|c| c.try_wait().ok().flatten())
        .expect("exited");
    assert!(status.success(), "{status}: {}", net.logs());
    net.assert_clean();
    let log = net.logs();
    assert!(log.contains("DNS = 10.96.0.10 is ignored"), "{log}");
}

#[test]
fn background_then_down_and_sigkill_then_down_clean_up() {
    if !e2e() {
        return;
    }
    let mut net = Net::with_gateway();
    let config = net.path("laptop.conf").to_string_lossy().into_owned();

    // `up -d` returns once the tunnel works; `down` stops it with SIGTERM.
    let (ok, out) = net.burrow_output(&["up", "--wg-config", &config, "-d"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("burrow0 is up in the background (pid"),
        "{out}"
    );
    assert!(out.contains("up-burrow0.log"), "{out}");
    assert_eq!(net.echo_through_tunnel(), "hello through burrow");
    let (ok, out) = net.burrow_output(&["up", "--wg-config", &config]);
    assert!(
        !ok && out.contains("is already running on burrow0"),
        "{out}"
    );
    let (ok, out) = net.burrow_output(&["down"]);
    assert!(ok, "{out}");
    assert!(out.contains("stopped `burrow up` on burrow0"), "{out}");
    assert!(out.contains("SIGTERM"), "{out}");
    net.assert_clean();

    // SIGKILL: the state file stays; `down` cleans up after it in one line.
    let (ok, out) = net.burrow_output(&["up", "--wg-config", &config, "-d"]);
    assert!(ok, "{out}");
    let pid = net.pid_in_state();
    net.signal(pid, nix::sys::signal::Signal::SIGKILL);
    net.wait_exit(pid);
    assert!(net.state_file().exists());
    let (ok, out) = net.burrow_output(&["down"]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains(&format!(
            "cleaned up after `burrow up` (pid {pid}) on burrow0"
        )),
        "{out}"
    );
    net.assert_clean();
    let (ok, out) = net.burrow_output(&["down"]);
    assert!(
        ok && out.contains("no `burrow up` is running on burrow0"),
        "{out}"
    );
}

#[test]
fn stale_state_with_a_leftover_device_and_route_is_removed() {
    if !e2e() {
        return;
    }
    let net = Net::new();
    // What a killed `burrow up` would leave if its device had outlived it:
    // a persistent TUN device with a route, and the state file naming them.
    ip(&[
        "-n",
        &net.laptop,
        "tuntap",
        "add",
        "dev",
        "burrow0",
        "mode",
        "tun",
    ]);
    ip(&["-n", &net.laptop, "link", "set", "burrow0", "up"]);
    ip(&["-n", &net.laptop, "route", "add", ROUTE, "dev", "burrow0"]);
    let index: u32 = ip(&["-n", &net.laptop, "-o", "link", "show", "burrow0"])
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("ifindex");
    let netns = {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(format!("/run/netns/{}", net.laptop))
            .expect("netns")
            .ino()
    };
    fs::create_dir_all(net.run_dir()).expect("run dir");
    // A pid that is certainly not running burrow: a finished child.
    let mut dead = Command::new("true").spawn().expect("spawn");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    fs::write(
        net.state_file(),
        serde_json::json!({
            "pid": dead_pid, "start_time": 1, "netns": netns, "ifname": "burrow0",
            "ifindex": index, "routes": [ROUTE], "config": "/nonexistent.conf", "ready": true
        })
        .to_string(),
    )
    .expect("state");
    let (ok, out) = net.burrow_output(&["down"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("removed device burrow0 with 1 route(s) and its state file"),
        "{out}"
    );
    net.assert_clean();

    // A device of the same name but another index is not ours: left alone.
    ip(&[
        "-n",
        &net.laptop,
        "tuntap",
        "add",
        "dev",
        "burrow0",
        "mode",
        "tun",
    ]);
    fs::write(
        net.state_file(),
        serde_json::json!({
            "pid": dead_pid, "start_time": 1, "netns": netns, "ifname": "burrow0",
            "ifindex": index, "routes": [ROUTE], "config": "/nonexistent.conf", "ready": true
        })
        .to_string(),
    )
    .expect("state");
    let (ok, out) = net.burrow_output(&["down"]);
    assert!(ok, "{out}");
    assert!(out.contains("already gone"), "{out}");
    assert!(net.device_exists(), "someone else's device must stay");
    assert!(!net.state_file().exists());
}

#[test]
fn sigkill_then_next_up_cleans_up_and_works() {
    if !e2e() {
        return;
    }
    let mut net = Net::with_gateway();
    let first = net.up_foreground("first.log");
    assert_eq!(net.echo_through_tunnel(), "hello through burrow");
    net.signal(first, nix::sys::signal::Signal::SIGKILL);
    net.wait_exit(first);
    assert!(net.state_file().exists(), "SIGKILL leaves the state file");

    let second = net.up_foreground("second.log");
    let log = fs::read_to_string(net.path("second.log")).expect("log");
    let notes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cleaned up after"))
        .collect();
    assert_eq!(notes.len(), 1, "{log}");
    assert!(
        notes[0].contains(&format!("`burrow up` (pid {first}) on burrow0")),
        "{log}"
    );
    assert_eq!(net.echo_through_tunnel(), "hello through burrow");
    net.signal(second, nix::sys::signal::Signal::SIGTERM);
    net.wait_exit(second);
    net.assert_clean();
}

#[test]
fn overlapping_route_is_refused() {
    if !e2e() {
        return;
    }
    let net = Net::with_gateway();
    ip(&[
        "-n",
        &net.laptop,
        "route",
        "add",
        "10.77.0.0/16",
        "via",
        GATEWAY_UNDERLAY,
    ]);
    let config = net.path("laptop.conf").to_string_lossy().into_owned();
    let (ok, out) = net.burrow_output(&["up", "--wg-config", &config]);
    assert!(!ok);
    assert!(
        out.contains(
            "refusing to add route 10.77.0.0/24 dev burrow0: it overlaps the existing route \
             `10.77.0.0/16 via 172.31.250.2 dev ul0`"
        ),
        "{out}"
    );
    // Refused before any change.
    assert!(!net.device_exists());
    assert!(!net.state_file().exists());
    assert!(net.routes().contains("10.77.0.0/16 via"));
}

#[test]
fn bad_configs_and_environments_are_refused_clearly() {
    if !e2e() {
        return;
    }
    let net = Net::new();
    let key = encode_key(&[7; 32]);
    let peer = encode_key(&[9; 32]);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad-key.conf",
            format!(
                "[Interface]\nPrivateKey = {key}\nAddress = 100.64.0.2/32\n[Peer]\nPublicKey = nope\n"
            ),
            "bad-key.conf:5: PublicKey",
        ),
        (
            "typo.conf",
            format!("[Interface]\nPrivateKey = {key}\nAdress = 100.64.0.2/32\n"),
            "typo.conf:3: unknown key `Adress` in [Interface]",
        ),
        (
            "full.conf",
            format!(
                "[Interface]\nPrivateKey = {key}\nAddress = 100.64.0.2/32\n[Peer]\nPublicKey = {peer}\n\
                 Endpoint = 172.31.250.2:51820\nAllowedIPs = 0.0.0.0/0\n"
            ),
            "full.conf:7: AllowedIPs 0.0.0.0/0 would send all traffic through the tunnel (full tunnel), which burrow does not support",
        ),
        (
            "endpoint.conf",
            format!(
                "[Interface]\nPrivateKey = {key}\nAddress = 100.64.0.2/32\n[Peer]\nPublicKey = {peer}\n\
                 Endpoint = fd00::1:51820\nAllowedIPs = 10.77.0.0/24\n"
            ),
            "endpoint.conf:6: Endpoint `fd00::1:51820`: an IPv6 endpoint is written [address]:port",
        ),
    ];
    for (name, text, want) in &cases {
        let path = net.write(name, text);
        let (ok, out) = net.burrow_output(&["up", "--wg-config", &path.to_string_lossy()]);
        assert!(!ok, "{name}: {out}");
        assert!(out.contains(want), "{name}: wanted {want}, got {out}");
        assert!(!net.device_exists());
    }
    let (ok, out) = net.burrow_output(&["up", "--wg-config", "/nonexistent/burrow.conf"]);
    assert!(
        !ok && out.contains("/nonexistent/burrow.conf: cannot read"),
        "{out}"
    );

    // The device name is taken by another interface.
    let good = net.write(
        "good.conf",
        &format!(
            "[Interface]\nPrivateKey = {key}\nAddress = 100.64.0.2/32\n[Peer]\nPublicKey = {peer}\n\
             Endpoint = 172.31.250.2:51820\nAllowedIPs = 10.77.0.0/24\n"
        ),
    );
    ip(&[
        "-n",
        &net.laptop,
        "link",
        "add",
        "burrow0",
        "type",
        "veth",
        "peer",
        "name",
        "bx0",
    ]);
    let (ok, out) = net.burrow_output(&["up", "--wg-config", &good.to_string_lossy()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("device name burrow0 is in use by another interface"),
        "{out}"
    );
    assert!(!net.state_file().exists());

    // Not root: says what needs root and how to run it.
    if Path::new("/usr/bin/setpriv").exists() {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BURROW])
            .args(["up", "--wg-config", &good.to_string_lossy()])
            .output()
            .expect("setpriv");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(
            err.trim(),
            "burrow: `burrow up` needs root: it creates a TUN device and routes. \
             Run it with sudo: `sudo burrow up ...`"
        );
    } else {
        eprintln!("setpriv not installed: not-root case skipped");
    }
}

#[test]
fn deleting_the_device_under_up_stops_it_cleanly() {
    if !e2e() {
        return;
    }
    let mut net = Net::new();
    // No gateway needed: the tunnel is never used.
    net.write(
        "laptop.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.2/32\n[Peer]\nPublicKey = {}\n\
             Endpoint = {GATEWAY_UNDERLAY}:51820\nAllowedIPs = {ROUTE}\n",
            encode_key(&secret().to_bytes()),
            public(&secret())
        ),
    );
    let pid = net.up_foreground("up.log");
    ip(&["-n", &net.laptop, "link", "del", "burrow0"]);
    net.wait_exit(pid);
    let log = fs::read_to_string(net.path("up.log")).expect("log");
    assert!(
        log.contains("burrow: device burrow0 was deleted while the tunnel ran; stopped"),
        "{log}"
    );
    net.assert_clean();
}

/// `up --framed-streams`: a stream that goes out of step (a frame longer
/// than any a gateway sends) is closed by burrow and replaced by a new
/// one; nothing more is read from it.
#[test]
fn a_framed_stream_out_of_step_is_closed_and_replaced() {
    if !e2e() {
        return;
    }
    let mut net = Net::new();
    let framed = format!("{GATEWAY_UNDERLAY}:51821");
    let listener = in_netns(&net.gateway, {
        let framed = framed.clone();
        move || TcpListener::bind(framed).expect("bind the framed port")
    });
    net.write(
        "laptop.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.2/24\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {framed}\nAllowedIPs = {ROUTE}\n",
            encode_key(&secret().to_bytes()),
            public(&secret())
        ),
    );
    net.up_foreground_with("up.log", &["--framed-streams", "1"]);

    let accept = |what: &str| {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                    return s;
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("no {what} within {TIMEOUT:?} ({e}): {}", net.logs()),
            }
        }
    };
    let mut first = accept("framed stream");
    // A frame header of 65,535 bytes, then bytes that never make a frame.
    first.write_all(&[0xff, 0xff]).expect("write");
    first.write_all(&[0u8; 4096]).expect("write");
    // burrow closes it: reads end (whatever it sent before, a handshake
    // initiation, is read first).
    let mut buf = [0u8; 4096];
    let closed_after = Instant::now();
    first
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    loop {
        match first.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Ok(_) | Err(_) => assert!(
                closed_after.elapsed() < TIMEOUT,
                "the out-of-step stream was not closed within {TIMEOUT:?}: {}",
                net.logs()
            ),
        }
    }
    let mut second = accept("new framed stream after the first went out of step");
    eprintln!(
        "up: out-of-step stream closed, a new one opened {:?} later",
        closed_after.elapsed()
    );
    // The new stream carries the tunnel's datagrams: the handshake
    // initiation (type 1, 148 bytes) framed as on the first.
    let mut header = [0u8; 2];
    second
        .read_exact(&mut header)
        .expect("a frame on the new stream");
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(header))];
    second.read_exact(&mut message).expect("the frame's bytes");
    assert_eq!(message.first(), Some(&1), "{message:?}");
    let logs = net.logs();
    assert!(logs.contains("out of step"), "{logs}");
}
