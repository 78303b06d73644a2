//! [`WgKey`]: a WireGuard (X25519) key, 32 bytes parsed once; base64 only
//! at the edges (JSON, files, logs).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WireGuard key. Serialised (and shown) in WireGuard's standard base64;
/// parsed from the standard or the URL-safe alphabet. A private key is one
/// too (the laptop's key file); [`WgKey::secret`] turns it into the
/// X25519 secret, [`WgKey::public_of`] gives a secret's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgKey([u8; 32]);

/// Why a text is not a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    NotBase64(String),
    WrongLength(usize),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotBase64(e) => write!(f, "a key is base64, this one is not: {e}"),
            KeyError::WrongLength(n) => write!(f, "a key is 32 bytes, this one is {n}"),
        }
    }
}

impl std::error::Error for KeyError {}

impl WgKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key of `secret`.
    pub fn public_of(secret: &StaticSecret) -> Self {
        Self(PublicKey::from(secret).to_bytes())
    }

    /// This key as an X25519 public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.0)
    }

    /// This key as an X25519 private key.
    pub fn secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }

    /// The first 8 characters of the base64 form: enough to tell peers
    /// apart in logs, as `wg show` users are used to.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl From<[u8; 32]> for WgKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<&PublicKey> for WgKey {
    fn from(key: &PublicKey) -> Self {
        Self(key.to_bytes())
    }
}

impl From<PublicKey> for WgKey {
    fn from(key: PublicKey) -> Self {
        Self(key.to_bytes())
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

/// Only the short form: a private key must not end up whole in a log.
impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({}…)", self.short())
    }
}

impl FromStr for WgKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
            .map_err(|e| KeyError::NotBase64(e.to_string()))?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(Self)
            .map_err(|_| KeyError::WrongLength(bytes.len()))
    }
}

impl Serialize for WgKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_at_the_edges_bytes_inside() {
        let k = WgKey::from([0xfb; 32]);
        let std = base64::engine::general_purpose::STANDARD.encode([0xfb; 32]);
        let url = base64::engine::general_purpose::URL_SAFE.encode([0xfb; 32]);
        assert_ne!(std, url);
        assert_eq!(k.to_string(), std);
        assert_eq!(std.parse::<WgKey>(), Ok(k));
        assert_eq!(url.parse::<WgKey>(), Ok(k));
        assert_eq!(format!(" {std}\n").parse::<WgKey>(), Ok(k));
        assert_eq!(k.short(), std[..8]);
        assert!(!format!("{k:?}").contains(&std));
        let e = "AAAA".parse::<WgKey>().expect_err("3 bytes");
        assert_eq!(e, KeyError::WrongLength(3));
        assert!(e.to_string().contains("32 bytes"), "{e}");
        assert!(matches!(
            "not a key!".parse::<WgKey>(),
            Err(KeyError::NotBase64(_))
        ));
        // JSON: the same string as before, both ways.
        let json = serde_json::to_string(&k).expect("json");
        assert_eq!(json, format!("\"{std}\""));
        assert_eq!(serde_json::from_str::<WgKey>(&json).expect("parse"), k);
        let e = serde_json::from_str::<WgKey>("\"AAAA\"").expect_err("short");
        assert!(e.to_string().contains("32 bytes"), "{e}");
    }

    #[test]
    fn public_of_a_secret() {
        let secret = StaticSecret::from([9u8; 32]);
        let k = WgKey::public_of(&secret);
        assert_eq!(k.public_key(), PublicKey::from(&secret));
        assert_eq!(
            WgKey::from([9u8; 32]).secret().to_bytes(),
            secret.to_bytes()
        );
    }
}
