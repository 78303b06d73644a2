//! Readiness probes: which one a container has (exec, HTTP, TCP, or alive
//! while running).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Probe {
    /// Ready while alive.
    Alive,
    Tcp(u16),
    Http {
        port: u16,
        path: String,
    },
    Exec(Vec<String>),
}

fn port_of(c: &Value, v: &Value) -> Option<u16> {
    if let Some(n) = v.as_u64() {
        return u16::try_from(n).ok();
    }
    let name = v.as_str()?;
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    c["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
}

pub(super) fn tcp_ports(c: &Value) -> Vec<u16> {
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
        })
        .collect()
}

pub(super) fn probe_of(c: &Value) -> Probe {
    let rp = &c["readinessProbe"];
    if rp["tcpSocket"].is_object()
        && let Some(p) = port_of(c, &rp["tcpSocket"]["port"])
    {
        return Probe::Tcp(p);
    }
    if rp["httpGet"].is_object()
        && let Some(p) = port_of(c, &rp["httpGet"]["port"])
    {
        return Probe::Http {
            port: p,
            path: rp["httpGet"]["path"].as_str().unwrap_or("/").to_string(),
        };
    }
    if let Some(cmd) = rp["exec"]["command"].as_array() {
        return Probe::Exec(
            cmd.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        );
    }
    match tcp_ports(c).first() {
        Some(&p) => Probe::Tcp(p),
        None => Probe::Alive,
    }
}
