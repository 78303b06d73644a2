//! Ends of a WireGuard tunnel inside a miniature cluster's namespaces:
//! `burrow up` (the product's laptop side) and wireguard-go configured with
//! `wg` (the reference implementation, for interoperability), plus what a
//! user would look at afterwards (`ip link`, `ip route`).
//!
//! Must never: configure anything outside the namespace it is given, or
//! leave a process it started running (each handle stops its process on
//! drop; the cluster's teardown kills whatever a crash left in its
//! namespaces).

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cluster::tail;
use crate::net;

/// How long a tunnel end may take to come up, and a process to exit after
/// a signal.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One WireGuard interface with one peer.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub private_key: String,
    /// The interface's own address, e.g. `100.64.0.2/32`.
    pub address: String,
    pub mtu: u16,
    pub listen_port: Option<u16>,
    pub peer_public_key: String,
    pub endpoint: Option<SocketAddrV4>,
    /// CIDRs sent to the peer (and routed into the interface).
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<u16>,
}

impl TunnelConfig {
    /// wg-quick format, as `burrow up --wg-config` reads it.
    pub fn wg_quick(&self) -> String {
        let mut s = String::from("[Interface]\n");
        let _ = writeln!(s, "PrivateKey = {}", self.private_key);
        let _ = writeln!(s, "Address = {}", self.address);
        let _ = writeln!(s, "MTU = {}", self.mtu);
        if let Some(p) = self.listen_port {
            let _ = writeln!(s, "ListenPort = {p}");
        }
        s.push_str(&self.peer_section());
        s
    }

    /// `wg setconf` format: no Address or MTU (those are `ip`'s business).
    pub fn wg_setconf(&self) -> String {
        let mut s = String::from("[Interface]\n");
        let _ = writeln!(s, "PrivateKey = {}", self.private_key);
        if let Some(p) = self.listen_port {
            let _ = writeln!(s, "ListenPort = {p}");
        }
        s.push_str(&self.peer_section());
        s
    }

    fn peer_section(&self) -> String {
        let mut s = String::from("\n[Peer]\n");
        let _ = writeln!(s, "PublicKey = {}", self.peer_public_key);
        if let Some(e) = self.endpoint {
            let _ = writeln!(s, "Endpoint = {e}");
        }
        let _ = writeln!(s, "AllowedIPs = {}", self.allowed_ips.join(", "));
        if let Some(k) = self.persistent_keepalive {
            let _ = writeln!(s, "PersistentKeepalive = {k}");
        }
        s
    }
}

/// Names of the network interfaces in `netns` (`ip -o link`).
pub fn links(netns: &str) -> Result<Vec<String>> {
    let out = net::run_cmd("ip", &["-n", netns, "-o", "link", "show"])?;
    // "2: eth0@if5: <BROADCAST,...> ..."
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

/// The IPv4 routes of `netns`, one `ip route` line each (main table).
pub fn routes(netns: &str) -> Result<Vec<String>> {
    let out = net::run_cmd("ip", &["-n", netns, "route", "show"])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Whether `routes` has `cidr` through device `dev`.
pub fn has_route(routes: &[String], cidr: &str, dev: &str) -> bool {
    routes.iter().any(|r| {
        let words: Vec<&str> = r.split_whitespace().collect();
        words.first() == Some(&cidr) && words.windows(2).any(|w| w == ["dev", dev])
    })
}

/// Whether `ifname` is up in `netns` with all of `cidrs` routed into it.
fn ready(netns: &str, ifname: &str, cidrs: &[String]) -> bool {
    let Ok(links) = links(netns) else {
        return false;
    };
    if !links.iter().any(|l| l == ifname) {
        return false;
    }
    let Ok(routes) = routes(netns) else {
        return false;
    };
    cidrs.iter().all(|c| has_route(&routes, c, ifname))
}

/// Sends `signal` to `child` and waits for it to exit, at most `patience`.
fn signal_and_wait(child: &mut Child, signal: Signal, patience: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
    let deadline = Instant::now() + patience;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// SIGTERM, then SIGKILL if it does not exit in time.
fn stop_child(child: &mut Child) {
    if signal_and_wait(child, Signal::SIGTERM, STOP_TIMEOUT).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn log_file(path: &Path) -> Result<fs::File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

// ------------------------------------------------------------- burrow up

/// The environment variable that moves burrow's state files (default
/// `/run/burrow`).
pub const BURROW_RUN_DIR: &str = "BURROW_RUN_DIR";

/// burrow's state directory for the tunnels whose files live in `dir`:
/// kept out of the machine's `/run/burrow`, so that test runs never see
/// each other's (or a user's) state.
pub fn burrow_run_dir(dir: &Path) -> PathBuf {
    dir.join("burrow-run")
}

/// A foreground `burrow up` in a namespace.
pub struct BurrowUp {
    child: Option<Child>,
    netns: String,
    ifname: String,
    log: PathBuf,
}

impl BurrowUp {
    /// Writes `config` to `dir/<ifname>.conf` and runs `burrow up
    /// --wg-config FILE --name IFNAME` (binary `burrow`) in `netns`, with
    /// its state in [`burrow_run_dir`]`(dir)`; returns once the device is up
    /// and every AllowedIPs CIDR is routed into it. Its output goes to
    /// `dir/<ifname>.log`.
    pub fn start(
        burrow: &Path,
        netns: &str,
        ifname: &str,
        config: &TunnelConfig,
        dir: &Path,
    ) -> Result<BurrowUp> {
        let conf = write_config(dir, ifname, config)?;
        let log = dir.join(format!("{ifname}.log"));
        let out = log_file(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(burrow)
            .arg("up")
            .arg("--wg-config")
            .arg(&conf)
            .args(["--name", ifname])
            .env(BURROW_RUN_DIR, burrow_run_dir(dir))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("running {} up", burrow.display()))?;
        let mut up = BurrowUp {
            child: Some(child),
            netns: netns.to_string(),
            ifname: ifname.to_string(),
            log,
        };
        let start = Instant::now();
        while !ready(netns, ifname, &config.allowed_ips) {
            if let Some(child) = up.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "burrow up exited ({status}) before {ifname} was up in {netns}:\n{}",
                    up.log_tail(30)
                );
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "burrow up: {ifname} not up with routes for {:?} in {netns} after {START_TIMEOUT:?}\nlinks: {:?}\nroutes: {:?}\nlog:\n{}",
                    config.allowed_ips,
                    links(netns).unwrap_or_default(),
                    routes(netns).unwrap_or_default(),
                    up.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(up)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The last lines of burrow's output.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Sends `signal` and waits for burrow to exit; an error if it does not
    /// within [`STOP_TIMEOUT`] (it is then killed).
    pub fn stop(mut self, signal: Signal) -> Result<ExitStatus> {
        let mut child = self.child.take().context("burrow up already stopped")?;
        match signal_and_wait(&mut child, signal, STOP_TIMEOUT) {
            Some(status) => Ok(status),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "burrow up did not exit within {STOP_TIMEOUT:?} of {signal}:\n{}",
                    tail(&self.log, 30)
                )
            }
        }
    }
}

impl Drop for BurrowUp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

fn write_config(dir: &Path, ifname: &str, config: &TunnelConfig) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{ifname}.conf"));
    fs::write(&path, config.wg_quick()).with_context(|| format!("writing {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

// ---------------------------------------------------------- wireguard-go

/// A wireguard-go interface in a namespace, configured with `wg setconf`
/// and `ip`: address, MTU, and a route for every AllowedIPs CIDR.
pub struct WireguardGo {
    child: Option<Child>,
    netns: String,
    ifname: String,
    log: PathBuf,
}

/// wireguard-go's control socket for `ifname` (not per network namespace:
/// interface names must be unique on the machine).
fn uapi_socket(ifname: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{ifname}.sock"))
}

impl WireguardGo {
    /// Starts `wireguard-go -f IFNAME` in `netns` (output to
    /// `dir/<ifname>.log`) and configures it from `config`.
    pub fn start(netns: &str, ifname: &str, config: &TunnelConfig, dir: &Path) -> Result<Self> {
        if uapi_socket(ifname).exists() {
            bail!(
                "{} exists: another wireguard-go runs an interface named {ifname}",
                uapi_socket(ifname).display()
            );
        }
        let log = dir.join(format!("{ifname}.log"));
        let out = log_file(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "wireguard-go", "-f", ifname])
            // Debian's wireguard-go refuses to run where the kernel module
            // exists unless told that userspace is what we want.
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("running wireguard-go (is the wireguard-go package installed?)")?;
        let mut wg = WireguardGo {
            child: Some(child),
            netns: netns.to_string(),
            ifname: ifname.to_string(),
            log,
        };
        let start = Instant::now();
        while !uapi_socket(ifname).exists() {
            if let Some(child) = wg.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "wireguard-go exited ({status}) before creating {ifname}:\n{}",
                    tail(&wg.log, 20)
                );
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "wireguard-go: no {} after {START_TIMEOUT:?}:\n{}",
                    uapi_socket(ifname).display(),
                    tail(&wg.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        net::run_cmd_input(
            "ip",
            &[
                "netns",
                "exec",
                netns,
                "wg",
                "setconf",
                ifname,
                "/dev/stdin",
            ],
            Some(&config.wg_setconf()),
        )
        .context("wg setconf (is wireguard-tools installed?)")?;
        let mut batch = vec![
            format!("addr add {} dev {ifname}", config.address),
            format!("link set {ifname} mtu {} up", config.mtu),
        ];
        for cidr in &config.allowed_ips {
            batch.push(format!("route add {cidr} dev {ifname}"));
        }
        net::run_cmd_input(
            "ip",
            &["-n", netns, "-batch", "-"],
            Some(&(batch.join("\n") + "\n")),
        )
        .with_context(|| format!("configuring {ifname} in {netns}"))?;
        Ok(wg)
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// `wg show IFNAME DUMP-FIELD` (e.g. `latest-handshakes`, `transfer`).
    pub fn show(&self, field: &str) -> Result<String> {
        net::run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "wg",
                "show",
                &self.ifname,
                field,
            ],
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
        // wireguard-go removes both on a clean exit; not after SIGKILL.
        let _ = fs::remove_file(uapi_socket(&self.ifname));
        if links(&self.netns).is_ok_and(|l| l.contains(&self.ifname)) {
            let _ = net::run_cmd("ip", &["-n", &self.netns, "link", "del", &self.ifname]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TunnelConfig {
        TunnelConfig {
            private_key: "PRIV".into(),
            address: "100.64.0.2/32".into(),
            mtu: 1420,
            listen_port: None,
            peer_public_key: "PUB".into(),
            endpoint: Some("192.168.240.1:31000".parse().expect("addr")),
            allowed_ips: vec!["10.96.0.0/12".into(), "10.244.0.0/16".into()],
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn config_formats() {
        let c = config();
        assert_eq!(
            c.wg_quick(),
            "[Interface]\nPrivateKey = PRIV\nAddress = 100.64.0.2/32\nMTU = 1420\n\n[Peer]\nPublicKey = PUB\nEndpoint = 192.168.240.1:31000\nAllowedIPs = 10.96.0.0/12, 10.244.0.0/16\nPersistentKeepalive = 25\n"
        );
        let s = c.wg_setconf();
        assert!(!s.contains("Address") && !s.contains("MTU"), "{s}");
        assert!(s.contains("AllowedIPs = 10.96.0.0/12, 10.244.0.0/16\n"));
    }

    #[test]
    fn routes_by_cidr_and_device() {
        let routes = vec![
            "10.96.0.0/12 dev burrow0 scope link".to_string(),
            "10.244.0.0/16 dev burrow0".to_string(),
            "192.168.240.0/24 dev eth0 proto kernel scope link src 192.168.240.2".to_string(),
        ];
        assert!(has_route(&routes, "10.96.0.0/12", "burrow0"));
        assert!(has_route(&routes, "10.244.0.0/16", "burrow0"));
        assert!(!has_route(&routes, "10.244.0.0/16", "burrow1"));
        assert!(!has_route(&routes, "10.0.0.0/8", "burrow0"));
    }
}
