//! The cluster's PKI: a CA, the API server's serving certificate and client
//! certificates (CN = user, O = groups) as `kubeadm` would make them, and
//! kubeconfig files pointing at the server.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The CA and the serving certificate, kept in memory (and written to the
/// directory given to [`Pki::generate`]).
pub struct Pki {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(1_700_000_000);
    // rcgen re-exports no clock; compute calendar dates from days since epoch.
    let (y, m, d) = civil_from_days(now / 86_400 - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = rcgen::date_time_ymd(y + 10, m, d.min(28));
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y as i32, m as u8, d as u8)
}

impl Pki {
    /// Generates a CA (`ca.crt`, `ca.key`) and a serving certificate for the
    /// API server (`apiserver.crt`, `apiserver.key`) valid for the given IP
    /// and DNS names (plus the usual `kubernetes.default.svc...` names), and
    /// writes them into `dir`.
    pub fn generate(dir: &Path, ip_sans: &[IpAddr], dns_sans: &[&str]) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let ca_params = ca_params();
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let ca_pem = ca_cert.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let mut names: Vec<String> = vec![
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
            "localhost".into(),
        ];
        names.extend(dns_sans.iter().map(|s| s.to_string()));
        for n in names {
            params
                .subject_alt_names
                .push(SanType::DnsName(n.try_into().context("invalid DNS SAN")?));
        }
        for ip in ip_sans {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params);
        let server_cert = params
            .signed_by(&server_key, &issuer)
            .context("signing the server certificate")?;

        let pki = Pki {
            ca_pem,
            ca_key_pem,
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            issuer,
        };
        for (file, contents) in [
            ("ca.crt", &pki.ca_pem),
            ("ca.key", &pki.ca_key_pem),
            ("apiserver.crt", &pki.server_cert_pem),
            ("apiserver.key", &pki.server_key_pem),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(pki)
    }

    /// The PKI [`Pki::generate`] wrote into `dir`, to sign more client
    /// certificates (a harness minting a user's kubeconfig for a running
    /// cluster).
    pub fn load(dir: &Path) -> anyhow::Result<Pki> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let ca_key_pem = read("ca.key")?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing ca.key")?;
        // The issuer of a certificate is the CA's name and key: the same
        // parameters as when it was generated sign for it.
        Ok(Pki {
            ca_pem: read("ca.crt")?,
            ca_key_pem,
            server_cert_pem: read("apiserver.crt")?,
            server_key_pem: read("apiserver.key")?,
            issuer: Issuer::new(ca_params(), ca_key),
        })
    }

    /// A client certificate for `user` in `groups` (CN = user, O = each
    /// group; at most two), signed by the CA: (certificate PEM, key PEM).
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate().context("generating a client key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // rcgen keeps one value per attribute type; the second group goes
        // in under the same OID (2.5.4.10) spelled as a custom type.
        if groups.len() > 2 {
            anyhow::bail!("at most two groups fit in a client certificate here, got {groups:?}");
        }
        for (i, g) in groups.iter().enumerate() {
            let ty = if i == 0 {
                DnType::OrganizationName
            } else {
                DnType::CustomDnType(vec![2, 5, 4, 10])
            };
            params.distinguished_name.push(ty, *g);
        }
        params.distinguished_name.push(DnType::CommonName, user);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params);
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a client certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The CA's certificate parameters (subject `CN=kubernetes`).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "kubernetes");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    params
}

/// Writes a kubeconfig with one cluster, one user and one context (all named
/// after the cluster, namespace `default`) and makes it current.
pub fn write_kubeconfig(
    path: &Path,
    cluster_name: &str,
    server_url: &str,
    ca_pem: &str,
    user: &str,
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<()> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": cluster_name,
            "cluster": {"server": server_url, "certificate-authority-data": b64(ca_pem)},
        }],
        "users": [{
            "name": user,
            "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
        }],
        "contexts": [{
            "name": cluster_name,
            "context": {"cluster": cluster_name, "user": user, "namespace": "default"},
        }],
        "current-context": cluster_name,
        "preferences": {},
    });
    let yaml = serde_yaml::to_string(&config).context("serializing the kubeconfig")?;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Subject of a DER certificate: (common name, organizations). A minimal
/// DER walk, enough for the certificates clients present.
pub fn subject_of(der: &[u8]) -> Option<(String, Vec<String>)> {
    // Certificate ::= SEQUENCE { tbsCertificate, ... }
    let (_, cert, _) = der_read(der)?;
    let (_, mut tbs, _) = der_read(cert)?;
    // tbsCertificate: [0] version (optional), serial, signature, issuer,
    // validity, subject, ...
    let (tag, _, rest) = der_read(tbs)?;
    tbs = if tag == 0xa0 { der_read(rest)?.2 } else { rest }; // skip serial
    let (_, _, rest) = der_read(tbs)?; // signature algorithm
    let (_, _, rest) = der_read(rest)?; // issuer
    let (_, _, rest) = der_read(rest)?; // validity
    let (_, mut subject, _) = der_read(rest)?;
    let mut cn = String::new();
    let mut orgs = Vec::new();
    while !subject.is_empty() {
        // RelativeDistinguishedName ::= SET OF AttributeTypeAndValue
        let (_, mut set, rest) = der_read(subject)?;
        subject = rest;
        while !set.is_empty() {
            let (_, atv, rest) = der_read(set)?;
            set = rest;
            let (_, oid, value) = der_read(atv)?;
            let (_, value, _) = der_read(value)?;
            let value = String::from_utf8_lossy(value).to_string();
            match oid {
                [0x55, 0x04, 0x03] => cn = value,
                [0x55, 0x04, 0x0a] => orgs.push(value),
                _ => {}
            }
        }
    }
    Some((cn, orgs))
}

/// Reads one DER TLV: (tag, contents, rest).
fn der_read(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((tag, &b[header..end], &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cert_subject_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::generate(
            dir.path(),
            &["127.0.0.1".parse().expect("ip")],
            &["apiserver"],
        )
        .expect("pki");
        let (cert, _key) = pki
            .client_cert("alice", &["system:masters", "devs"])
            .expect("cert");
        let der = rustls_pemfile::certs(&mut cert.as_bytes())
            .next()
            .expect("one cert")
            .expect("pem");
        let (cn, orgs) = subject_of(&der).expect("subject");
        assert_eq!(cn, "alice");
        assert_eq!(orgs, vec!["system:masters".to_string(), "devs".to_string()]);
        assert!(dir.path().join("ca.crt").exists());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
