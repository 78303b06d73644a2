//! Pod admission by sysctls (the kubelet's safe set), writing the admitted
//! ones in the pod's own namespaces, and rejecting a pod as the kubelet does.

use std::fs;
use std::time::SystemTime;

use anyhow::Context;
use minicluster_apiserver::resources::must;
use minicluster_apiserver::{ApiError, Store};
use serde_json::{Value, json};

use crate::ctx::NODE_NAME;
use crate::net;

use super::now;
use super::pod::pod_rt;

/// The sysctls a kubelet allows without `--allowed-unsafe-sysctls` (the
/// kubelet's `SafeSysctlAllowlist` on a kernel new enough for all of them).
/// This kubelet allows no unsafe ones.
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// A sysctl name with `.` separators (`net/ipv4/conf/eth0.100/forwarding`
/// → `net.ipv4.conf.eth0/100.forwarding`), as the kubelet normalises them.
pub fn normalize_sysctl(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => name
            .chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                c => c,
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// Where a normalised sysctl lives under `/proc/sys`.
fn sysctl_path(name: &str) -> String {
    let rel: String = name
        .chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect();
    format!("/proc/sys/{rel}")
}

/// The pod's `securityContext.sysctls` as the kubelet admits them: every
/// name in [`SAFE_SYSCTLS`] (and not of a namespace the pod shares with the
/// host), else the rejection message (`forbidden sysctl: "x" not
/// allowlisted`, reason `SysctlForbidden`). Ok: (name, value) pairs,
/// normalised.
pub fn admit_sysctls(pod: &Value) -> Result<Vec<(String, String)>, String> {
    let spec = &pod["spec"];
    let mut out = Vec::new();
    for s in spec["securityContext"]["sysctls"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = normalize_sysctl(s["name"].as_str().unwrap_or(""));
        let value = s["value"].as_str().unwrap_or("").to_string();
        if !SAFE_SYSCTLS.contains(&name.as_str()) {
            return Err(format!("forbidden sysctl: \"{name}\" not allowlisted"));
        }
        let (host_ns, ns) = if name.starts_with("net.") {
            (spec["hostNetwork"].as_bool() == Some(true), "net")
        } else {
            (spec["hostIPC"].as_bool() == Some(true), "ipc")
        };
        if host_ns {
            return Err(format!(
                "forbidden sysctl: \"{name}\" not allowed with host {ns} enabled"
            ));
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Writes the pod's admitted sysctls: `net.*` in its network namespace, the
/// IPC ones in a new IPC namespace shared by its containers. Returns that
/// namespace (held open by the file; it goes when the file and the pod's
/// processes are gone).
pub(super) fn pod_namespaces(
    netns: &str,
    sysctls: &[(String, String)],
) -> anyhow::Result<fs::File> {
    for (name, value) in sysctls.iter().filter(|(n, _)| n.starts_with("net.")) {
        net::netns_sysctl(netns, name, value)
            .with_context(|| format!("write sysctl key {name}"))?;
    }
    let ipc: Vec<(String, String)> = sysctls
        .iter()
        .filter(|(n, _)| !n.starts_with("net."))
        .cloned()
        .collect();
    std::thread::spawn(move || -> anyhow::Result<fs::File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)
            .context("creating the pod's IPC namespace")?;
        for (name, value) in &ipc {
            fs::write(sysctl_path(name), value)
                .with_context(|| format!("write sysctl key {name}"))?;
        }
        fs::File::open("/proc/thread-self/ns/ipc").context("opening the pod's IPC namespace")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the IPC namespace thread panicked"))?
}

/// Marks a pod the kubelet refused to admit: phase Failed with the reason
/// and `Pod was rejected: <message>`, and a Warning event, as the kubelet's
/// `rejectPod` does. Nothing of the pod is started.
pub(super) fn reject_pod(store: &Store, pod: &Value, reason: &str, message: &str) {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    tracing::warn!("kubelet: rejecting pod {ns}/{name}: {reason}: {message}");
    let status = json!({
        "phase": "Failed",
        "reason": reason,
        "message": format!("Pod was rejected: {message}"),
        "qosClass": minicluster_apiserver::admission::pod_qos_class(&pod["spec"]),
        "startTime": now(),
    });
    let rt = pod_rt();
    let _ = store.update_with(rt, ns, name, |obj| {
        if obj["metadata"]["uid"].as_str() != Some(uid.as_str()) {
            return Err(ApiError::conflict(rt, "", "replaced"));
        }
        obj["status"] = status;
        Ok(())
    });
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": format!("{name}.{nanos:x}"), "namespace": ns},
        "involvedObject": {
            "apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns, "uid": uid,
            "resourceVersion": pod["metadata"]["resourceVersion"],
        },
        "reason": reason,
        "message": message,
        "type": "Warning",
        "source": {"component": "kubelet", "host": NODE_NAME},
        "reportingComponent": "kubelet",
        "reportingInstance": NODE_NAME,
        "firstTimestamp": now(),
        "lastTimestamp": now(),
        "count": 1,
    });
    if let Err(e) = store.create(must("core/v1/events"), ns, event) {
        tracing::debug!("kubelet: event for {ns}/{name}: {e:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_admitted_like_the_kubelet() {
        assert_eq!(
            normalize_sysctl("net/ipv4/conf/eth0.100/forwarding"),
            "net.ipv4.conf.eth0/100.forwarding"
        );
        assert_eq!(
            normalize_sysctl("net.ipv4.ping_group_range"),
            "net.ipv4.ping_group_range"
        );
        assert_eq!(
            sysctl_path("net.ipv4.conf.eth0/100.forwarding"),
            "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
        );
        let pod = |sysctls: Value| json!({"spec": {"securityContext": {"sysctls": sysctls}}});
        assert_eq!(
            admit_sysctls(&pod(json!([
                {"name": "net.ipv4.ping_group_range", "value": "0 2147483647"},
                {"name": "net/ipv4/ip_unprivileged_port_start", "value": "1024"},
                {"name": "kernel.shm_rmid_forced", "value": "1"},
            ]))),
            Ok(vec![
                (
                    "net.ipv4.ping_group_range".to_string(),
                    "0 2147483647".to_string()
                ),
                (
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "1024".to_string()
                ),
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
            ])
        );
        assert_eq!(admit_sysctls(&json!({"spec": {}})), Ok(vec![]));
        assert_eq!(
            admit_sysctls(&pod(json!([
                {"name": "net.ipv4.ping_group_range", "value": "0 1"},
                {"name": "net.core.somaxconn", "value": "1024"},
            ]))),
            Err("forbidden sysctl: \"net.core.somaxconn\" not allowlisted".to_string())
        );
        let mut host = pod(json!([{"name": "net.ipv4.tcp_syncookies", "value": "1"}]));
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(
            admit_sysctls(&host),
            Err(
                "forbidden sysctl: \"net.ipv4.tcp_syncookies\" not allowed with host net enabled"
                    .to_string()
            )
        );
    }
}
