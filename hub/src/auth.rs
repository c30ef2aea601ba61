//! Who may call what.
//!
//! ```text
//! [auth] operator_token (config)   bootstrap operator: can make the credentials below
//! credential (store)               id, role (erp | operator | customer), name,
//!                                  customer_id (customer only), sha256 of the token
//! ```
//!
//! A credential's token is `fs_<role>_<64 hex digits>` (256 random bits), shown once when
//! it is made; the store keeps only its sha256 (a salted slow hash buys nothing for a
//! random 256-bit secret, and a lookup by digest needs no scan). Every request looks its
//! token up in the store, so a revocation holds at once on every hub process.
//!
//! Roles: `operator` calls the ops API (`/v1/ops`), `erp` the system API (`/v1/erp`),
//! `customer` the portal API for its own customer only. No role is implied by another.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// What a credential may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The ERP's system API.
    Erp,
    /// The operator API.
    Operator,
    /// The portal API, for one customer.
    Customer,
}

impl Role {
    /// The role's name in JSON and in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Erp => "erp",
            Role::Operator => "operator",
            Role::Customer => "customer",
        }
    }
}

/// A credential as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Its id (16 hex digits).
    pub id: String,
    /// What it may call.
    pub role: Role,
    /// Who holds it, as operators name it (the source of decisions made with it).
    pub name: String,
    /// The customer a `customer` credential sees.
    pub customer_id: Option<String>,
    /// sha256 of the token.
    pub token_sha256: [u8; 32],
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The config's operator token.
    Bootstrap,
    /// A credential from the store.
    Credential(Credential),
}

impl Principal {
    /// Whether the caller has `role` (the bootstrap token is an operator).
    pub fn has(&self, role: Role) -> bool {
        match self {
            Principal::Bootstrap => role == Role::Operator,
            Principal::Credential(c) => c.role == role,
        }
    }

    /// The name decisions made by this caller are recorded under.
    pub fn name(&self) -> String {
        match self {
            Principal::Bootstrap => "bootstrap operator token".into(),
            Principal::Credential(c) => format!("{} ({})", c.name, c.id),
        }
    }

    /// The customer a customer credential is for.
    pub fn customer(&self) -> Option<&str> {
        match self {
            Principal::Credential(c) if c.role == Role::Customer => c.customer_id.as_deref(),
            _ => None,
        }
    }
}

/// The sha256 a token is stored and looked up under.
pub fn token_sha256(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A new credential and its token (to show once).
pub fn issue(
    role: Role,
    name: &str,
    customer_id: Option<&str>,
    now_ms: u64,
) -> Result<(Credential, String), String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err("name: 1 to 100 characters, no control characters".into());
    }
    let customer_id = match (role, customer_id) {
        (Role::Customer, Some(c)) => {
            validate_customer_id(c).map_err(|e| format!("customer_id: {e}"))?;
            Some(c.to_string())
        }
        (Role::Customer, None) => {
            return Err("customer_id: required for the customer role".into());
        }
        (_, Some(_)) => {
            return Err(format!(
                "customer_id: only for the customer role, not {}",
                role.as_str()
            ));
        }
        (_, None) => None,
    };
    let secret: [u8; 32] = rand::random();
    let token = format!("fs_{}_{}", role.as_str(), hex::encode(secret));
    let id: [u8; 8] = rand::random();
    Ok((
        Credential {
            id: hex::encode(id),
            role,
            name: name.to_string(),
            customer_id,
            token_sha256: token_sha256(&token),
            created_ms: now_ms,
        },
        token,
    ))
}

/// A customer id as the ERP sends it: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn validate_customer_id(c: &str) -> Result<(), String> {
    if c.is_empty()
        || c.len() > 64
        || !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{c:?} is not 1 to 64 of A-Z, a-z, 0-9, '.', '_', '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_stored_only_as_digests() {
        let (a, ta) = issue(Role::Erp, "SAP prod", None, 1).unwrap();
        let (b, tb) = issue(Role::Erp, "SAP prod", None, 1).unwrap();
        assert_ne!(ta, tb);
        assert_ne!(a.id, b.id);
        assert!(ta.starts_with("fs_erp_") && ta.len() == 7 + 64, "{ta}");
        assert_eq!(a.token_sha256, token_sha256(&ta));
        assert!(!format!("{a:?}").contains(&ta[7..]));
    }

    #[test]
    fn customer_id_belongs_to_the_customer_role_only() {
        assert!(issue(Role::Customer, "ACME portal", None, 1).is_err());
        assert!(issue(Role::Erp, "x", Some("ACME"), 1).is_err());
        assert!(issue(Role::Customer, "x", Some("AC ME"), 1).is_err());
        assert!(issue(Role::Operator, " ", None, 1).is_err());
        let (c, _) = issue(Role::Customer, "ACME portal", Some("ACME"), 1).unwrap();
        let p = Principal::Credential(c);
        assert_eq!(p.customer(), Some("ACME"));
        assert!(p.has(Role::Customer) && !p.has(Role::Operator));
        assert!(Principal::Bootstrap.has(Role::Operator));
        assert!(!Principal::Bootstrap.has(Role::Erp));
    }
}
