//! Proof that a registering laptop holds the private key of the public key
//! it registers, so nobody can register (and so refresh, rename or pin an
//! address for) a key that is not theirs.
//!
//! The gateway hands out a nonce (`GET /v1/info`); the laptop answers with
//! a keyed BLAKE2s MAC of the nonce and both public keys, keyed by the
//! X25519 shared secret of its private key and the gateway's public key.
//! Only the holder of either private key can compute it. Nonces are
//! stateless — a timestamp and the gateway's own MAC of it under a key that
//! lives only in the process — and expire after [`NONCE_LIFETIME_SECS`].

use base64::Engine as _;
use blake2::Blake2sMac256;
use blake2::digest::{KeyInit, Mac};
use boringtun::x25519::{PublicKey, StaticSecret};

/// How long a nonce is accepted.
pub const NONCE_LIFETIME_SECS: u64 = 120;
const LABEL: &[u8] = b"burrow register v1";
const NONCE_LEN: usize = 8 + 16;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // A 32-byte key always fits BLAKE2s's key size.
    let mut m = <Blake2sMac256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <Blake2sMac256 as KeyInit>::new(&Default::default()));
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// A nonce for `now` (Unix seconds) under the gateway's nonce key.
pub fn nonce(nonce_key: &[u8; 32], now: u64) -> String {
    let t = now.to_be_bytes();
    let tag = mac(nonce_key, &[b"nonce", &t]);
    let mut out = [0u8; NONCE_LEN];
    out[..8].copy_from_slice(&t);
    out[8..].copy_from_slice(&tag[..16]);
    b64().encode(out)
}

/// Whether `nonce` was made under `nonce_key` within the lifetime.
pub fn check_nonce(nonce_key: &[u8; 32], nonce: &str, now: u64) -> Result<(), &'static str> {
    let raw = b64().decode(nonce).map_err(|_| "the nonce is not base64")?;
    if raw.len() != NONCE_LEN {
        return Err("the nonce has the wrong length");
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&raw[..8]);
    let tag = mac(nonce_key, &[b"nonce", &t]);
    if !constant_time_eq(&tag[..16], &raw[8..]) {
        return Err("the nonce was not made by this gateway (it may have restarted): ask again");
    }
    let made = u64::from_be_bytes(t);
    if made > now.saturating_add(5) || now.saturating_sub(made) > NONCE_LIFETIME_SECS {
        return Err("the nonce has expired: ask again");
    }
    Ok(())
}

/// The laptop's proof for `nonce`.
pub fn sign(laptop: &StaticSecret, gateway: &PublicKey, nonce: &str) -> String {
    let shared = laptop.diffie_hellman(gateway);
    let me = PublicKey::from(laptop);
    b64().encode(mac(
        shared.as_bytes(),
        &[LABEL, me.as_bytes(), gateway.as_bytes(), nonce.as_bytes()],
    ))
}

/// Whether `proof` shows that the registrant holds `laptop`'s private key.
pub fn verify(gateway: &StaticSecret, laptop: &PublicKey, nonce: &str, proof: &str) -> bool {
    let Ok(given) = b64().decode(proof) else {
        return false;
    };
    let shared = gateway.diffie_hellman(laptop);
    // A low-order public key gives an all-zero secret anyone can compute.
    if !shared.was_contributory() {
        return false;
    }
    let me = PublicKey::from(gateway);
    let want = mac(
        shared.as_bytes(),
        &[LABEL, laptop.as_bytes(), me.as_bytes(), nonce.as_bytes()],
    );
    constant_time_eq(&want, &given)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_key_and_nonce() {
        let gw = StaticSecret::from([7u8; 32]);
        let laptop = StaticSecret::from([9u8; 32]);
        let other = StaticSecret::from([11u8; 32]);
        let key = [1u8; 32];
        let n = nonce(&key, 1_000);
        assert_eq!(check_nonce(&key, &n, 1_050), Ok(()));
        assert!(check_nonce(&key, &n, 1_000 + NONCE_LIFETIME_SECS + 1).is_err());
        assert!(
            check_nonce(&[2u8; 32], &n, 1_000).is_err(),
            "another gateway's"
        );
        assert!(check_nonce(&key, "AAAA", 1_000).is_err());
        let p = sign(&laptop, &PublicKey::from(&gw), &n);
        assert!(verify(&gw, &PublicKey::from(&laptop), &n, &p));
        assert!(
            !verify(&gw, &PublicKey::from(&other), &n, &p),
            "someone else's key"
        );
        assert!(!verify(
            &gw,
            &PublicKey::from(&laptop),
            &nonce(&key, 1_001),
            &p
        ));
        assert!(!verify(&gw, &PublicKey::from(&laptop), &n, "not base64!"));
        // The all-zero (low-order) key.
        let zero = PublicKey::from([0u8; 32]);
        let forged = b64().encode(mac(
            &[0u8; 32],
            &[
                LABEL,
                zero.as_bytes(),
                PublicKey::from(&gw).as_bytes(),
                n.as_bytes(),
            ],
        ));
        assert!(!verify(&gw, &zero, &n, &forged));
    }
}
