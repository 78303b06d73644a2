//! NetworkPolicy (`networking.k8s.io/v1`): defaulting and validation as the
//! real registry does them. The stand-in stores policies and never enforces
//! them, like a cluster whose network plugin has no policy support; what a
//! test can check is that they are there and well-formed.

use std::net::IpAddr;

use serde_json::{Value, json};

/// The real defaulter: every port's protocol is TCP unless given;
/// `policyTypes` is `[Ingress]`, plus `Egress` when egress rules exist.
pub fn default(obj: &mut Value) {
    if !obj["spec"].is_object() {
        obj["spec"] = json!({});
    }
    let spec = &mut obj["spec"];
    if spec["podSelector"].is_null() {
        spec["podSelector"] = json!({});
    }
    for (rules, _) in [("ingress", "from"), ("egress", "to")] {
        for rule in spec[rules].as_array_mut().into_iter().flatten() {
            for port in rule["ports"].as_array_mut().into_iter().flatten() {
                if port.is_object() && port["protocol"].is_null() {
                    port["protocol"] = json!("TCP");
                }
            }
        }
    }
    if spec["policyTypes"].as_array().is_none_or(|t| t.is_empty()) {
        let mut types = vec![json!("Ingress")];
        if spec["egress"].as_array().is_some_and(|e| !e.is_empty()) {
            types.push(json!("Egress"));
        }
        spec["policyTypes"] = Value::Array(types);
    }
}

/// The real validation's messages, one per problem, prefixed by the field
/// path (`spec.ingress[0].ports[1].endPort: Invalid value: ...`).
pub fn validate(obj: &Value, errs: &mut Vec<String>) {
    let spec = &obj["spec"];
    for (rules, peers) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in spec[rules].as_array().into_iter().flatten().enumerate() {
            let path = format!("spec.{rules}[{i}]");
            for (j, port) in rule["ports"].as_array().into_iter().flatten().enumerate() {
                validate_port(&format!("{path}.ports[{j}]"), port, errs);
            }
            for (j, peer) in rule[peers].as_array().into_iter().flatten().enumerate() {
                validate_peer(&format!("{path}.{peers}[{j}]"), peer, errs);
            }
        }
    }
    let types = spec["policyTypes"].as_array().map(Vec::as_slice);
    for (i, t) in types.unwrap_or_default().iter().enumerate() {
        let t = t.as_str().unwrap_or("");
        if !matches!(t, "Ingress" | "Egress") {
            errs.push(format!(
                "spec.policyTypes[{i}]: Unsupported value: {t:?}: supported values: \"Ingress\", \"Egress\""
            ));
        }
    }
    if types.is_some_and(|t| t.len() > 2) {
        errs.push(format!(
            "spec.policyTypes: Invalid value: {}: may not specify more than two policyTypes",
            spec["policyTypes"]
        ));
    }
}

const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

fn validate_port(path: &str, port: &Value, errs: &mut Vec<String>) {
    let proto = port["protocol"].as_str().unwrap_or("TCP");
    if !matches!(proto, "TCP" | "UDP" | "SCTP") {
        errs.push(format!(
            "{path}.protocol: Unsupported value: {proto:?}: {}",
            crate::admission::SUPPORTED_PORT_PROTOCOLS
        ));
    }
    let end = &port["endPort"];
    match &port["port"] {
        Value::Null => {
            if !end.is_null() {
                errs.push(format!(
                    "{path}.endPort: Invalid value: {end}: may not be specified when `port` is not specified"
                ));
            }
        }
        Value::Number(n) => {
            let p = n.as_i64().unwrap_or(0);
            if !(1..=65535).contains(&p) {
                errs.push(format!("{path}.port: Invalid value: {n}: {PORT_RANGE}"));
            }
            if let Some(e) = end.as_i64() {
                if e < p {
                    errs.push(format!(
                        "{path}.endPort: Invalid value: {p}: must be greater than or equal to `port`"
                    ));
                }
                if !(1..=65535).contains(&e) {
                    errs.push(format!("{path}.endPort: Invalid value: {e}: {PORT_RANGE}"));
                }
            }
        }
        Value::String(name) => {
            if !end.is_null() {
                errs.push(format!(
                    "{path}.endPort: Invalid value: {end}: may not be specified when `port` is non-numeric"
                ));
            }
            if let Some(why) = port_name_problem(name) {
                errs.push(format!("{path}.port: Invalid value: {name:?}: {why}"));
            }
        }
        other => errs.push(format!(
            "{path}.port: Invalid value: {other}: must be an integer or a port name"
        )),
    }
}

/// IANA_SVC_NAME, as `validation.IsValidPortName` checks it.
fn port_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        return Some("must be no more than 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if name.contains("--") {
        return Some("must not contain consecutive hyphens");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Some("must contain at least one letter (a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("must not begin or end with a hyphen");
    }
    None
}

fn validate_peer(path: &str, peer: &Value, errs: &mut Vec<String>) {
    let has = |k: &str| !peer[k].is_null();
    let selectors = usize::from(has("podSelector")) + usize::from(has("namespaceSelector"));
    if selectors == 0 && !has("ipBlock") {
        errs.push(format!("{path}: Required value: must specify a peer"));
    } else if selectors > 0 && has("ipBlock") {
        errs.push(format!(
            "{path}: Forbidden: may not specify both ipBlock and another peer"
        ));
    }
    if has("ipBlock") {
        validate_ip_block(&format!("{path}.ipBlock"), &peer["ipBlock"], errs);
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Whether `inner` lies inside `outer` and is smaller.
fn strict_subset(outer: (IpAddr, u8), inner: (IpAddr, u8)) -> bool {
    if outer.0.is_ipv4() != inner.0.is_ipv4() || inner.1 <= outer.1 {
        return false;
    }
    // Addresses are left-aligned in 128 bits, so a prefix of `len` bits is
    // the top `len` bits for either family.
    let mask = u128::MAX.checked_shl(128 - u32::from(outer.1)).unwrap_or(0);
    bits(outer.0) & mask == bits(inner.0) & mask
}

fn validate_ip_block(path: &str, block: &Value, errs: &mut Vec<String>) {
    let cidr = block["cidr"].as_str().unwrap_or("");
    if cidr.is_empty() {
        errs.push(format!("{path}.cidr: Required value"));
        return;
    }
    let Some(outer) = parse_cidr(cidr) else {
        errs.push(format!(
            "{path}.cidr: Invalid value: {cidr:?}: must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
        ));
        return;
    };
    for (i, e) in block["except"].as_array().into_iter().flatten().enumerate() {
        let text = e.as_str().unwrap_or("");
        match parse_cidr(text) {
            None => errs.push(format!(
                "{path}.except[{i}]: Invalid value: {text:?}: must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
            )),
            Some(inner) if !strict_subset(outer, inner) => errs.push(format!(
                "{path}.except[{i}]: Invalid value: {text:?}: must be a strict subset of `cidr`"
            )),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(spec: Value) -> Vec<String> {
        let mut obj = json!({"metadata": {"name": "p"}, "spec": spec});
        default(&mut obj);
        let mut errs = Vec::new();
        validate(&obj, &mut errs);
        errs
    }

    #[test]
    fn defaults_policy_types_and_protocols() {
        let mut obj = json!({"spec": {"ingress": [{"ports": [{"port": 80}]}]}});
        default(&mut obj);
        assert_eq!(obj["spec"]["policyTypes"], json!(["Ingress"]));
        assert_eq!(obj["spec"]["podSelector"], json!({}));
        assert_eq!(obj["spec"]["ingress"][0]["ports"][0]["protocol"], "TCP");
        let mut obj = json!({"spec": {"egress": [{}]}});
        default(&mut obj);
        assert_eq!(obj["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        let mut obj = json!({"spec": {"policyTypes": ["Egress"]}});
        default(&mut obj);
        assert_eq!(obj["spec"]["policyTypes"], json!(["Egress"]));
    }

    #[test]
    fn accepts_what_burrow_ships() {
        let errs = errors(json!({
            "podSelector": {"matchLabels": {"app": "x"}},
            "ingress": [
                {"ports": [{"port": 51820, "protocol": "UDP"}, {"port": 51821}]},
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": 1024, "endPort": 9089}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}], "ports": [{"port": "metrics"}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]},
            ],
        }));
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn refuses_what_the_real_server_refuses() {
        let errs = errors(json!({
            "ingress": [
                {"ports": [{"port": 70000}, {"port": 90, "endPort": 80}, {"endPort": 80}, {"port": "http", "endPort": 90}, {"port": 1, "protocol": "ICMP"}]},
                {"from": [{}, {"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}, {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16", "10.0.0.0/8"]}}]},
            ],
            "policyTypes": ["Sideways"],
        }));
        let want = [
            "spec.ingress[0].ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
            "spec.ingress[0].ports[1].endPort: Invalid value: 90: must be greater than or equal to `port`",
            "spec.ingress[0].ports[2].endPort: Invalid value: 80: may not be specified when `port` is not specified",
            "spec.ingress[0].ports[3].endPort: Invalid value: 90: may not be specified when `port` is non-numeric",
            "spec.ingress[0].ports[4].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
            "spec.ingress[1].from[0]: Required value: must specify a peer",
            "spec.ingress[1].from[1]: Forbidden: may not specify both ipBlock and another peer",
            "spec.ingress[1].from[2].ipBlock.except[0]: Invalid value: \"11.0.0.0/16\": must be a strict subset of `cidr`",
            "spec.ingress[1].from[2].ipBlock.except[1]: Invalid value: \"10.0.0.0/8\": must be a strict subset of `cidr`",
            "spec.policyTypes[0]: Unsupported value: \"Sideways\": supported values: \"Ingress\", \"Egress\"",
        ];
        assert_eq!(errs, want);
    }
}
