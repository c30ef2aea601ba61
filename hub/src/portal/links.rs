//! Signed capability tokens: tracking links for consignees and short-lived POD image URLs.
//!
//! ```text
//! token  = base64url(claims) "." base64url(HMAC-SHA256(key, claims)[..16])
//! claims = "t|" exp_s "|" credential_id "|" nonce_hex "|" shipment_id   tracking link
//!        | "p|" exp_s "|" sha256_hex "|" shipment_id                   one POD blob
//! ```
//!
//! The shipment id goes last: it is the only part that may hold `|`. New tokens are
//! signed with the first configured key; a token signed with any configured key is
//! accepted, so a key is rotated by putting a new one first and dropping the old one once
//! its links have expired (dropping a key revokes every link it signed). Verification
//! compares MACs in constant time and answers only "valid claims" or "no": the caller
//! turns every "no" (tampered, expired, unknown key, wrong kind) into the same 404.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the MAC kept in a token (128 bits).
const MAC_BYTES: usize = 16;
/// Longest token accepted for parsing (a shipment id is at most 128 bytes).
pub const MAX_TOKEN_LEN: usize = 512;
/// Shortest signing key accepted in the config.
pub const MIN_KEY_LEN: usize = 32;

/// What a tracking link grants: one shipment, until `exp_s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkClaims {
    /// The shipment.
    pub shipment_id: String,
    /// Expiry (seconds since the Unix epoch).
    pub exp_s: u64,
    /// The customer credential that made it (the link dies with it).
    pub credential_id: String,
    /// Random, so two links for the same shipment differ.
    pub nonce: String,
}

/// What a POD URL grants: one blob of one shipment's POD, until `exp_s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobClaims {
    /// The shipment whose POD names the blob.
    pub shipment_id: String,
    /// The blob's sha256 (hex).
    pub sha256_hex: String,
    /// Expiry (seconds since the Unix epoch).
    pub exp_s: u64,
}

/// The keys tokens are signed and checked with.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Signer {
    /// A signer with `keys` (signs with the first). `None` if there is no key.
    pub fn new(keys: &[String]) -> Option<Signer> {
        if keys.is_empty() {
            return None;
        }
        Some(Signer {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        })
    }

    /// A signer with one random key (links die with the process).
    pub fn random() -> Signer {
        let k: [u8; 32] = rand::random();
        Signer {
            keys: vec![hex::encode(k).into_bytes()],
        }
    }

    fn mac(key: &[u8], claims: &[u8]) -> [u8; MAC_BYTES] {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
        m.update(claims);
        let full = m.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    fn sign(&self, claims: &str) -> String {
        let key = self.keys.first().expect("a signer has at least one key");
        let mac = Self::mac(key, claims.as_bytes());
        format!("{}.{}", B64.encode(claims), B64.encode(mac))
    }

    /// The claims of `token` if one of the keys signed it (expiry not checked here).
    fn open(&self, token: &str) -> Option<String> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let (c, m) = token.split_once('.')?;
        let claims = B64.decode(c).ok()?;
        let mac = B64.decode(m).ok()?;
        if mac.len() != MAC_BYTES {
            return None;
        }
        let ok = self.keys.iter().fold(false, |ok, k| {
            ok | crate::api::secret_eq(&Self::mac(k, &claims), &mac)
        });
        if !ok {
            return None;
        }
        String::from_utf8(claims).ok()
    }

    /// A tracking link token.
    pub fn link(&self, c: &LinkClaims) -> String {
        self.sign(&format!(
            "t|{}|{}|{}|{}",
            c.exp_s, c.credential_id, c.nonce, c.shipment_id
        ))
    }

    /// The claims of a tracking link token that is genuine and not expired at `now_s`.
    pub fn open_link(&self, token: &str, now_s: u64) -> Option<LinkClaims> {
        let claims = self.open(token)?;
        let mut p = claims.splitn(5, '|');
        if p.next()? != "t" {
            return None;
        }
        let exp_s: u64 = p.next()?.parse().ok()?;
        let credential_id = p.next()?.to_string();
        let nonce = p.next()?.to_string();
        let shipment_id = p.next()?.to_string();
        (now_s < exp_s).then_some(LinkClaims {
            shipment_id,
            exp_s,
            credential_id,
            nonce,
        })
    }

    /// A POD blob URL token.
    pub fn blob(&self, c: &BlobClaims) -> String {
        self.sign(&format!("p|{}|{}|{}", c.exp_s, c.sha256_hex, c.shipment_id))
    }

    /// The claims of a POD blob token that is genuine and not expired at `now_s`.
    pub fn open_blob(&self, token: &str, now_s: u64) -> Option<BlobClaims> {
        let claims = self.open(token)?;
        let mut p = claims.splitn(4, '|');
        if p.next()? != "p" {
            return None;
        }
        let exp_s: u64 = p.next()?.parse().ok()?;
        let sha256_hex = p.next()?.to_string();
        let shipment_id = p.next()?.to_string();
        (now_s < exp_s).then_some(BlobClaims {
            shipment_id,
            sha256_hex,
            exp_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> LinkClaims {
        LinkClaims {
            shipment_id: "S|1".into(),
            exp_s: 1000,
            credential_id: "abcd".into(),
            nonce: "00ff".into(),
        }
    }

    #[test]
    fn links_round_trip_expire_and_refuse_tampering() {
        let s = Signer::new(&["k".repeat(32)]).unwrap();
        let t = s.link(&claims());
        assert_eq!(s.open_link(&t, 999), Some(claims()));
        assert_eq!(s.open_link(&t, 1000), None, "expired");
        // One character of the claims or of the MAC changed.
        for i in [0, t.len() - 1] {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(s.open_link(&String::from_utf8(b).unwrap(), 1), None);
        }
        // A later expiry under the same MAC.
        let forged = format!(
            "{}.{}",
            B64.encode("t|9999|abcd|00ff|S|1"),
            t.split_once('.').unwrap().1
        );
        assert_eq!(s.open_link(&forged, 1), None);
        // Another key does not accept it; a POD token is not a link.
        assert_eq!(
            Signer::new(&["x".repeat(32)]).unwrap().open_link(&t, 1),
            None
        );
        let b = s.blob(&BlobClaims {
            shipment_id: "S|1".into(),
            sha256_hex: "ab".into(),
            exp_s: 1000,
        });
        assert_eq!(s.open_link(&b, 1), None);
        assert_eq!(s.open_blob(&b, 1).unwrap().sha256_hex, "ab");
        assert_eq!(s.open_blob(&t, 1), None);
        assert_eq!(s.open_link("garbage", 1), None);
        assert_eq!(s.open_link(&"a.".repeat(400), 1), None);
    }

    #[test]
    fn rotation_signs_with_the_first_and_accepts_every_key() {
        let old = Signer::new(&["o".repeat(32)]).unwrap();
        let t_old = old.link(&claims());
        let both = Signer::new(&["n".repeat(32), "o".repeat(32)]).unwrap();
        assert!(both.open_link(&t_old, 1).is_some(), "old links still work");
        let t_new = both.link(&claims());
        assert!(
            old.open_link(&t_new, 1).is_none(),
            "signed with the new key"
        );
        let new_only = Signer::new(&["n".repeat(32)]).unwrap();
        assert!(new_only.open_link(&t_new, 1).is_some());
        assert!(
            new_only.open_link(&t_old, 1).is_none(),
            "dropping a key revokes its links"
        );
    }
}
