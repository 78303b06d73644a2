//! Kubernetes names, checked before they reach a URL, a patch or a label
//! selector. kube's request builder does not escape a name (`echo#` would
//! become `.../services/echo`, `a/b` another path): every name that comes
//! from a request, a label or an annotation goes through here first.

/// Longest name of a Service burrow reroutes: its shadow Service
/// `<name>-burrow-shadow` must itself be a valid Service name (63).
pub const MAX_REROUTED_SERVICE: usize = 63 - SHADOW_SUFFIX.len();
/// Suffix of a rerouted Service's shadow Service.
pub const SHADOW_SUFFIX: &str = "-burrow-shadow";
/// Suffix of burrow's EndpointSlice for a rerouted Service.
pub const SLICE_SUFFIX: &str = "-burrow";

fn shown(s: &str) -> String {
    let cut: String = s.chars().take(80).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// An RFC 1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63): the
/// shape of a namespace name.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// An RFC 1123 subdomain (dot-separated RFC 1123 labels, at most 253):
/// the shape of most object names (Deployments, Pods, ConfigMaps,
/// Secrets).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// An RFC 1035 label (an RFC 1123 label starting with a letter): the shape
/// of a Service name.
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

pub fn check_namespace(s: &str) -> Result<(), String> {
    if is_dns1123_label(s) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid namespace name: lower-case letters, digits and '-', at most 63 characters, starting and ending with a letter or digit",
            shown(s)
        ))
    }
}

pub fn check_service(s: &str) -> Result<(), String> {
    if is_dns1035_label(s) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid Service name: lower-case letters, digits and '-', at most 63 characters, starting with a letter and ending with a letter or digit",
            shown(s)
        ))
    }
}

/// A Service burrow can reroute: a valid name short enough for its shadow.
pub fn check_rerouted_service(s: &str) -> Result<(), String> {
    check_service(s)?;
    if s.len() > MAX_REROUTED_SERVICE {
        return Err(format!(
            "Service name {} is too long to reroute: burrow names a shadow Service `<name>{SHADOW_SUFFIX}`, so names of at most {MAX_REROUTED_SERVICE} characters can be rerouted",
            shown(s)
        ));
    }
    Ok(())
}

/// A Service port's name: an RFC 1123 label, as the API server validates
/// it (`kubectl create service` names ports `80-8080`). Container ports'
/// names are IANA service names (at most 15 characters, a letter, no
/// '--'); a Service's are not.
pub fn check_port_name(s: &str) -> Result<(), String> {
    if is_dns1123_label(s) {
        Ok(())
    } else {
        Err(format!("{} is not a valid Service port name", shown(s)))
    }
}

/// A header rule: an HTTP token name and a visible-ASCII value.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~";
    let name_ok = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || TCHAR.contains(&b));
    if !name_ok {
        return Err(format!("{} is not an HTTP header name", shown(name)));
    }
    let value_ok = value.len() <= 4096
        && value
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b));
    if !value_ok {
        return Err(format!("{} is not an HTTP header value", shown(value)));
    }
    Ok(())
}

/// The shadow Service of a rerouted Service (`name` checked by
/// [`check_rerouted_service`]).
pub fn shadow_name(service: &str) -> String {
    format!("{service}{SHADOW_SUFFIX}")
}

/// burrow's EndpointSlice for a rerouted Service.
pub fn slice_name(service: &str) -> String {
    format!("{service}{SLICE_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains() {
        assert!(is_dns1123_subdomain("api-1.v2"));
        for bad in ["", "a..b", ".a", "a/b", "A", "a#", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            "echo#",
            "a/b",
            "x?y",
            "..",
            "Echo",
            "-a",
            "a-",
            "a b",
            "a%2Fb",
            "kube-dns#",
            &"a".repeat(64),
        ] {
            assert!(check_service(bad).is_err(), "{bad:?}");
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
        assert!(
            check_service("9lives").is_err(),
            "Service names start with a letter"
        );
        assert!(check_namespace("9lives").is_ok());
        assert!(check_service(&"a".repeat(63)).is_ok());
        assert!(check_rerouted_service(&"a".repeat(50)).is_err());
        assert!(check_rerouted_service(&"a".repeat(49)).is_ok());
        assert_eq!(shadow_name(&"a".repeat(49)).len(), 63);
    }

    #[test]
    fn port_names_and_headers() {
        assert!(check_port_name("http").is_ok());
        assert!(check_port_name("h2c-web").is_ok());
        // What `kubectl create service clusterip x --tcp=81:8081` names it.
        assert!(check_port_name("81-8081").is_ok());
        assert!(check_port_name("8080").is_ok());
        assert!(check_port_name("a--b").is_ok());
        assert!(check_port_name("longer-than-fifteen-characters").is_ok());
        assert!(check_port_name("").is_err());
        assert!(check_port_name("-web").is_err());
        assert!(check_port_name("web-").is_err());
        assert!(check_port_name("Web").is_err());
        assert!(check_port_name("web.http").is_err());
        assert!(check_port_name(&"p".repeat(64)).is_err());
        assert!(check_header("x-burrow-route", "alice").is_ok());
        assert!(check_header("x route", "a").is_err());
        assert!(check_header("x:y", "a").is_err());
        assert!(check_header("x", "a\r\nb").is_err());
    }
}
