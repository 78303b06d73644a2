//! Network namespaces of a miniature cluster: the node (pod bridge `cbr0`,
//! underlay bridge `ul0`, iptables base rules), laptops on the underlay, pods
//! on the pod bridge; running code inside a namespace; teardown and gc.
//!
//! Every `ip`/`iptables` command here runs inside a namespace this module
//! created (`ip -n NS`, `ip netns exec NS`): the machine's own network
//! configuration is never touched.

use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::future::BoxFuture;

use crate::ctx::{
    CLUSTER_DNS_IP, CORP_DNS_IP, ClusterCtx, NETNS_PREFIX, NODE_UNDERLAY_IP, POD_CIDR, POD_GATEWAY,
    SERVICE_CIDR, STATE_ROOT, UNDERLAY_CIDR, laptop_ip,
};

/// Pod bridge in the node namespace.
pub const POD_BRIDGE: &str = "cbr0";
/// Underlay bridge in the node namespace.
pub const UNDERLAY_BRIDGE: &str = "ul0";

/// Runs a command; a failure is an error naming the command and its stderr.
pub fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<String> {
    run_cmd_input(program, args, None)
}

/// Like [`run_cmd`], feeding `input` on stdin.
pub fn run_cmd_input(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let shown = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running `{}`", shown()))?;
    if let Some(input) = input
        && let Some(mut stdin) = child.stdin.take()
    {
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{}`", shown()))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running `{}`", shown()))?;
    if !out.status.success() {
        let mut msg = format!(
            "`{}` failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if let Some(input) = input {
            msg.push_str(&format!("\ninput was:\n{input}"));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS -batch -`: several `ip` commands in one process.
fn ip_batch(netns: &str, commands: &[String]) -> anyhow::Result<()> {
    let input = commands.join("\n") + "\n";
    run_cmd_input("ip", &["-n", netns, "-batch", "-"], Some(&input)).map(|_| ())
}

/// Runs `program args` inside `netns` (`ip netns exec`).
pub fn netns_exec(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", netns, program];
    all.extend_from_slice(args);
    run_cmd("ip", &all)
}

/// Writes a sysctl inside `netns` (`/proc/sys/net` is per network namespace).
pub fn netns_sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    let shown = format!("{key}={value} in {netns}");
    in_netns(netns, move || fs::write(&path, value))?.with_context(|| format!("sysctl {shown}"))
}

/// A pod's namespace name: `mc-<cluster>-p-<uid prefix>`.
pub fn netns_name_for_pod(cluster: &str, uid_prefix: &str) -> String {
    crate::ctx::netns_name(cluster, &format!("p-{uid_prefix}"))
}

/// The path of a named network namespace.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

pub fn netns_exists(netns: &str) -> bool {
    netns_path(netns).exists()
}

fn add_netns(netns: &str) -> anyhow::Result<()> {
    if netns_exists(netns) {
        bail!("network namespace {netns} already exists (leftover? run `minicluster gc`)");
    }
    run_cmd("ip", &["netns", "add", netns])?;
    Ok(())
}

/// `/etc/netns/<netns>/`: files `ip netns exec` bind-mounts over `/etc`.
pub fn etc_netns_dir(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// `create_dir_all` for a directory in `/run/minicluster` or `/etc/netns`,
/// which another cluster's teardown removes when it finds them empty
/// ([`teardown`]): if that happens between the making of the root and of
/// `dir` (two clusters starting at once on a fresh machine), the root is
/// made again.
pub fn create_dir_shared(dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::create_dir_all(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 100 => tries += 1,
            r => return r,
        }
    }
}

fn write_resolv_conf(netns: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = etc_netns_dir(netns);
    create_dir_shared(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("resolv.conf");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The base iptables rules of the node namespace (`iptables-restore` input).
/// kube-proxy ([`crate::proxy`]) later fills the `KUBE-*` chains.
pub fn node_iptables_base() -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
-A PREROUTING -i {ul} -d {svc} -j RETURN
-A PREROUTING -i {ul} -d {pods} -j RETURN
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -s {pods} -o {cbr} -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -i {ul} -d {pods} -j DROP
-A INPUT -i {ul} -d {svc} -j DROP
-A INPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES
-A FORWARD -i {ul} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i {ul} -o {cbr} -m conntrack --ctstate DNAT -j ACCEPT
-A FORWARD -i {ul} ! -o {ul} -j DROP
-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
COMMIT
",
        ul = UNDERLAY_BRIDGE,
        cbr = POD_BRIDGE,
        svc = SERVICE_CIDR,
        pods = POD_CIDR,
    )
}

/// Creates the node namespace: loopback, forwarding, the pod bridge `cbr0`
/// (10.244.0.1/16), the underlay bridge `ul0` (192.168.240.1/24 and the
/// corporate resolver's 192.168.240.53), a route for the ClusterIP range and
/// the iptables base rules. Also creates the state directory.
pub fn create_node(ctx: &ClusterCtx) -> anyhow::Result<()> {
    fs::create_dir_all(&ctx.state_dir)
        .with_context(|| format!("creating {}", ctx.state_dir.display()))?;
    let node = ctx.node_netns();
    add_netns(&node)?;
    let prefix_len = |cidr: &str| cidr.split('/').nth(1).unwrap_or("32").to_string();
    let pod_len = prefix_len(POD_CIDR);
    let ul_len = prefix_len(UNDERLAY_CIDR);
    ip_batch(
        &node,
        &[
            "link set lo up".to_string(),
            format!("link add {POD_BRIDGE} type bridge forward_delay 0"),
            format!("addr add {POD_GATEWAY}/{pod_len} dev {POD_BRIDGE}"),
            format!("link set {POD_BRIDGE} up"),
            format!("link add {UNDERLAY_BRIDGE} type bridge forward_delay 0"),
            format!("addr add {NODE_UNDERLAY_IP}/{ul_len} dev {UNDERLAY_BRIDGE}"),
            format!("addr add {CORP_DNS_IP}/{ul_len} dev {UNDERLAY_BRIDGE}"),
            format!("link set {UNDERLAY_BRIDGE} up"),
            // ClusterIPs are virtual: the route only gets packets to the
            // OUTPUT/PREROUTING DNAT (or the REJECT of an empty Service).
            format!("route add {SERVICE_CIDR} dev {POD_BRIDGE} src {POD_GATEWAY}"),
        ],
    )?;
    netns_sysctl(&node, "net.ipv4.ip_forward", "1")?;
    run_cmd_input(
        "ip",
        &["netns", "exec", &node, "iptables-restore"],
        Some(&node_iptables_base()),
    )?;
    Ok(())
}

/// Takes the underlay link of laptop namespace `netns` down (`up` false:
/// as a laptop whose Wi-Fi goes away: its address stays, its routes go,
/// sends fail with "network unreachable") or back up (the routes return).
pub fn set_laptop_link(netns: &str, up: bool) -> anyhow::Result<()> {
    let state = if up { "up" } else { "down" };
    ip_batch(netns, &[format!("link set eth0 {state}")])
}

/// Gives laptop namespace `netns` the underlay address `address` instead
/// of the one it has (a new DHCP lease, another network): the old address
/// and its routes go, as on a real laptop. Connections bound to the old
/// address are left as they are (the kernel does not reset them).
pub fn set_laptop_address(netns: &str, address: std::net::Ipv4Addr) -> anyhow::Result<()> {
    let ul_len = UNDERLAY_CIDR.split('/').nth(1).unwrap_or("24");
    ip_batch(
        netns,
        &[
            "addr flush dev eth0".to_string(),
            format!("addr add {address}/{ul_len} dev eth0"),
        ],
    )
}

/// Creates laptop `index` (1-based): a namespace whose only link is a veth on
/// the node's underlay bridge, address 192.168.240.(1+index)/24, no default
/// route, and the corporate resolver in its resolv.conf. Returns its name.
pub fn create_laptop(ctx: &ClusterCtx, index: usize) -> anyhow::Result<String> {
    let node = ctx.node_netns();
    let laptop = ctx.laptop_netns(index);
    add_netns(&laptop)?;
    let ul_len = UNDERLAY_CIDR.split('/').nth(1).unwrap_or("24");
    let host_side = format!("ul-l{index}");
    ip_batch(
        &node,
        &[
            format!("link add {host_side} type veth peer name eth0 netns {laptop}"),
            format!("link set {host_side} master {UNDERLAY_BRIDGE} up"),
        ],
    )?;
    ip_batch(
        &laptop,
        &[
            "link set lo up".to_string(),
            format!("addr add {}/{ul_len} dev eth0", laptop_ip(index)),
            "link set eth0 up".to_string(),
        ],
    )?;
    write_resolv_conf(
        &laptop,
        &format!("nameserver {CORP_DNS_IP}\nsearch corp.example\n"),
    )?;
    Ok(laptop)
}

/// The pod's resolv.conf.
pub fn pod_resolv_conf(pod_namespace: &str) -> String {
    format!(
        "nameserver {CLUSTER_DNS_IP}\nsearch {pod_namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )
}

/// The node-side veth name of a pod namespace (`vp-<uid prefix>`).
fn pod_veth(netns: &str) -> String {
    let suffix = netns.rsplit('-').next().unwrap_or(netns);
    let mut name = format!("vp-{suffix}");
    name.truncate(15);
    name
}

/// Creates a pod's namespace: veth into `cbr0`, `eth0` with `ip`/16, default
/// route via the node, loopback, unprivileged low ports (as containerd does),
/// and `/etc/netns/<netns>/resolv.conf` for cluster DNS.
pub fn create_pod_net(
    ctx: &ClusterCtx,
    netns: &str,
    ip: Ipv4Addr,
    pod_namespace: &str,
) -> anyhow::Result<()> {
    let node = ctx.node_netns();
    add_netns(netns)?;
    let result = (|| {
        let veth = pod_veth(netns);
        let pod_len = POD_CIDR.split('/').nth(1).unwrap_or("16");
        ip_batch(
            &node,
            &[
                format!("link add {veth} type veth peer name eth0 netns {netns}"),
                format!("link set {veth} master {POD_BRIDGE} up"),
            ],
        )?;
        ip_batch(
            netns,
            &[
                "link set lo up".to_string(),
                format!("addr add {ip}/{pod_len} dev eth0"),
                "link set eth0 up".to_string(),
                format!("route add default via {POD_GATEWAY}"),
            ],
        )?;
        netns_sysctl(netns, "net.ipv4.ip_unprivileged_port_start", "0")?;
        write_resolv_conf(netns, &pod_resolv_conf(pod_namespace))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = delete_pod_net(netns);
    }
    result
}

/// Deletes a pod's namespace (and with it its veth) and its `/etc/netns` dir.
pub fn delete_pod_net(netns: &str) -> anyhow::Result<()> {
    let mut err = None;
    if netns_exists(netns)
        && let Err(e) = run_cmd("ip", &["netns", "del", netns])
    {
        err = Some(e);
    }
    let dir = etc_netns_dir(netns);
    if dir.exists()
        && let Err(e) = fs::remove_dir_all(&dir)
    {
        err.get_or_insert(anyhow!("removing {}: {e}", dir.display()));
    }
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs `f` on a fresh thread that entered network namespace `netns`
/// (sockets created there belong to it). Used to bind listeners and dial
/// inside a namespace.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = netns_path(netns);
    let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let shown = netns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {shown}"))?;
            drop(file);
            Ok(f())
        })
        .context("spawning a thread")?
        .join()
        .map_err(|_| anyhow!("the thread running in network namespace {netns} panicked"))?
}

/// Connects to `addr` from inside a namespace.
pub type Dialer =
    Arc<dyn Fn(SocketAddr) -> BoxFuture<'static, io::Result<tokio::net::TcpStream>> + Send + Sync>;

/// A dialer that connects from inside `node_netns` (5 s timeout). The socket
/// is created on a short-lived thread inside the namespace; the connect
/// itself is asynchronous.
pub fn dialer(node_netns: &str) -> Dialer {
    let netns = node_netns.to_string();
    Arc::new(move |addr: SocketAddr| {
        let netns = netns.clone();
        Box::pin(async move { dial_in(&netns, addr, Duration::from_secs(5)).await })
    })
}

/// Connects to `addr` from inside `netns` within `timeout`.
pub async fn dial_in(
    netns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let v4 = addr.is_ipv4();
    let socket = in_netns(netns, move || {
        if v4 {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    })
    .map_err(|e| io::Error::other(format!("{e:#}")))??;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => {
            // As Go's dialer (the kubelet's, the API server's) leaves every
            // TCP connection: Nagle off.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {addr} from {netns} timed out"),
        )),
    }
}

/// Every named network namespace.
pub fn list_netns() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether `netns` is one of cluster `cluster`'s namespaces (node, laptop,
/// laptopN, p-<8 hex>), exactly, so that cluster `a` never matches `a-b`'s.
pub fn is_cluster_netns(cluster: &str, netns: &str) -> bool {
    let Some(role) = netns.strip_prefix(&format!("{NETNS_PREFIX}{cluster}-")) else {
        return false;
    };
    if role == "node" || role == "laptop" {
        return true;
    }
    if let Some(n) = role.strip_prefix("laptop") {
        return !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    }
    if let Some(hex) = role.strip_prefix("p-") {
        return hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    false
}

/// Pids of processes in `netns` (never our own).
fn netns_pids(netns: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    run_cmd("ip", &["netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p != me)
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in `netns`.
pub fn kill_netns_processes(netns: &str) {
    for pid in netns_pids(netns) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn remove_netns_fully(netns: &str, errors: &mut Vec<String>) {
    kill_netns_processes(netns);
    if netns_exists(netns)
        && let Err(e) = run_cmd("ip", &["netns", "del", netns])
    {
        errors.push(format!("{e:#}"));
    }
    let dir = etc_netns_dir(netns);
    if dir.exists()
        && let Err(e) = fs::remove_dir_all(&dir)
    {
        errors.push(format!("removing {}: {e}", dir.display()));
    }
}

/// Kills every process whose command line mentions `needle` (never our own
/// process or our parent).
fn kill_by_cmdline(needle: &str) {
    let me = std::process::id() as i32;
    let parent = nix::unistd::getppid().as_raw();
    let Ok(rd) = fs::read_dir("/proc") else {
        return;
    };
    for entry in rd.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || pid == parent || pid == 1 {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn finish(errors: Vec<String>) -> anyhow::Result<()> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("teardown incomplete:\n{}", errors.join("\n")))
    }
}

/// Tears a cluster down: kills every process in its namespaces (and any
/// whose command line mentions its state dir), deletes the namespaces (and
/// with them every veth, bridge and iptables rule), removes their
/// `/etc/netns` dirs and the state dir. Idempotent.
pub fn teardown(cluster: &str) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let state_dir = Path::new(STATE_ROOT).join(cluster);
    kill_by_cmdline(&format!("{}/", state_dir.display()));
    let mut names = list_netns();
    // Pods first, the node last (its bridge holds their veths' peers).
    names.sort_by_key(|n| n.ends_with("-node"));
    for netns in names.iter().filter(|n| is_cluster_netns(cluster, n)) {
        remove_netns_fully(netns, &mut errors);
    }
    // /etc/netns dirs whose namespace is already gone.
    if let Ok(rd) = fs::read_dir("/etc/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_cluster_netns(cluster, &name)
                && let Err(err) = fs::remove_dir_all(e.path())
            {
                errors.push(format!("removing {}: {err}", e.path().display()));
            }
        }
    }
    if state_dir.exists()
        && let Err(e) = fs::remove_dir_all(&state_dir)
    {
        errors.push(format!("removing {}: {e}", state_dir.display()));
    }
    // Only if empty.
    let _ = fs::remove_dir(STATE_ROOT);
    let _ = fs::remove_dir("/etc/netns");
    finish(errors)
}

/// Removes every leftover of any miniature cluster: every `mc-*` namespace
/// and its processes, `/etc/netns/mc-*`, every state dir, and stray
/// processes whose command line mentions `/run/minicluster`.
pub fn gc_all() -> anyhow::Result<()> {
    let mut errors = Vec::new();
    kill_by_cmdline(&format!("{STATE_ROOT}/"));
    let mut names: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect();
    names.sort_by_key(|n| n.ends_with("-node"));
    for netns in &names {
        remove_netns_fully(netns, &mut errors);
    }
    if let Ok(rd) = fs::read_dir("/etc/netns") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(NETNS_PREFIX)
                && let Err(err) = fs::remove_dir_all(e.path())
            {
                errors.push(format!("removing {}: {err}", e.path().display()));
            }
        }
    }
    if Path::new(STATE_ROOT).exists()
        && let Err(e) = fs::remove_dir_all(STATE_ROOT)
    {
        errors.push(format!("removing {STATE_ROOT}: {e}"));
    }
    let _ = fs::remove_dir("/etc/netns");
    finish(errors)
}

/// Whether we can create namespaces (root). Tests skip without it unless
/// `BURROW_E2E=1`, which makes them fail instead ([`root_or_skip`]).
pub fn have_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The one gate of the end-to-end tests: true with root; without root,
/// false (skip, saying so) or a panic when `BURROW_E2E=1` (CI) demands a run.
pub fn root_or_skip(test: &str) -> bool {
    if have_root() {
        return true;
    }
    if std::env::var("BURROW_E2E").as_deref() == Ok("1") {
        panic!("{test} needs root for network namespaces (BURROW_E2E=1 demands it)");
    }
    eprintln!(
        "skipping {test}: end-to-end tests need root (set BURROW_E2E=1 to make this a failure)"
    );
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn test_ctx(tag: &str) -> ClusterCtx {
        let name = format!("t{}{tag}", std::process::id());
        ClusterCtx {
            state_dir: Path::new(STATE_ROOT).join(&name),
            name,
            bin_dir: std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().and_then(|p| p.parent()).map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("/nonexistent")),
            ca_pem: "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n".to_string(),
            issue_token: Arc::new(|ns, sa| format!("token-{ns}-{sa}")),
        }
    }

    /// Tears the test cluster down on drop, also on panic.
    pub(crate) struct Guard(pub String);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Err(e) = teardown(&self.0) {
                eprintln!("teardown of {}: {e:#}", self.0);
            }
        }
    }

    /// A teardown elsewhere removes the shared root whenever it finds it
    /// empty (here: all the time); making a directory in it still works.
    #[test]
    fn a_dir_in_a_root_that_another_teardown_removes_is_made() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("minicluster");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let remover = {
            let (root, stop) = (root.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::remove_dir(&root);
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        for i in 0..2000 {
            let dir = root.join(format!("c{i}"));
            create_dir_shared(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            assert!(dir.is_dir());
            fs::remove_dir(&dir).expect("remove");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        remover.join().expect("remover");
    }

    #[test]
    fn cluster_netns_matching_is_exact() {
        assert!(is_cluster_netns("a", "mc-a-node"));
        assert!(is_cluster_netns("a", "mc-a-laptop"));
        assert!(is_cluster_netns("a", "mc-a-laptop3"));
        assert!(is_cluster_netns("a", "mc-a-p-0123abcd"));
        assert!(!is_cluster_netns("a", "mc-a-b-node"));
        assert!(!is_cluster_netns("a", "mc-a-p-p-0123abcd"));
        assert!(!is_cluster_netns("a", "mc-ab-node"));
        assert!(!is_cluster_netns("a", "mc-a-laptopx"));
        assert_eq!(pod_veth("mc-demo-p-0123abcd"), "vp-0123abcd");
    }

    #[test]
    fn resolv_conf_of_a_pod() {
        assert_eq!(
            pod_resolv_conf("data"),
            "nameserver 10.96.0.10\nsearch data.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn node_pod_and_laptop_connectivity() {
        if !root_or_skip("node_pod_and_laptop_connectivity") {
            return;
        }
        let ctx = test_ctx("n");
        let _guard = Guard(ctx.name.clone());
        create_node(&ctx).expect("node");
        let laptop = create_laptop(&ctx, 1).expect("laptop");
        let pod = format!("mc-{}-p-0000beef", ctx.name);
        let pod_ip = Ipv4Addr::new(10, 244, 0, 7);
        create_pod_net(&ctx, &pod, pod_ip, "default").expect("pod");
        assert!(
            fs::read_to_string(etc_netns_dir(&pod).join("resolv.conf"))
                .expect("resolv")
                .contains("ndots:5")
        );

        // A listener inside the pod, dialled from the node.
        let listener = in_netns(&pod, || std::net::TcpListener::bind("0.0.0.0:8080"))
            .expect("netns")
            .expect("bind");
        let server = std::thread::spawn(move || {
            for _ in 0..1 {
                let (mut s, _) = listener.accept().expect("accept");
                s.write_all(b"hello").expect("write");
            }
        });
        let node = ctx.node_netns();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let got = rt.block_on(async {
            let mut s = dialer(&node)(SocketAddr::from((pod_ip, 8080)))
                .await
                .expect("dial");
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
                .await
                .expect("read");
            buf
        });
        assert_eq!(got, b"hello");
        server.join().expect("server");

        // The pod reaches the node (default route), the laptop reaches the
        // node's underlay address, and nothing of the pod network.
        let node_l = in_netns(&node, || std::net::TcpListener::bind("0.0.0.0:7777"))
            .expect("netns")
            .expect("bind");
        let reach = |from: &str, to: Ipv4Addr, port: u16| {
            in_netns(from, move || {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::from((to, port)),
                    Duration::from_millis(700),
                )
            })
            .expect("netns")
        };
        reach(&pod, POD_GATEWAY, 7777).expect("pod → node");
        reach(&laptop, NODE_UNDERLAY_IP, 7777).expect("laptop → node");
        drop(node_l);
        // Laptops see each other on the underlay (bridged, not dropped).
        let laptop2 = create_laptop(&ctx, 2).expect("laptop2");
        let l1 = in_netns(&laptop, || std::net::TcpListener::bind("0.0.0.0:7000"))
            .expect("netns")
            .expect("bind");
        reach(&laptop2, laptop_ip(1), 7000).expect("laptop2 → laptop");
        drop(l1);
        // Even with a route, the laptop can't reach pods.
        netns_exec(
            &laptop,
            "ip",
            &["route", "add", "10.244.0.0/16", "via", "192.168.240.1"],
        )
        .expect("route");
        let l2 = in_netns(&pod, || std::net::TcpListener::bind("0.0.0.0:8081"))
            .expect("netns")
            .expect("bind");
        l2.set_nonblocking(true).expect("nonblocking");
        let r = reach(&laptop, pod_ip, 8081);
        assert!(r.is_err(), "laptop reached a pod: {r:?}");

        delete_pod_net(&pod).expect("delete pod");
        assert!(!netns_exists(&pod));
        assert!(!etc_netns_dir(&pod).exists());
        teardown(&ctx.name).expect("teardown");
        assert!(list_netns().iter().all(|n| !is_cluster_netns(&ctx.name, n)));
        assert!(!etc_netns_dir(&laptop).exists());
    }
}
