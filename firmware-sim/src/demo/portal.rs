//! The demo's way into the web pages: a customer credential for the business at the
//! first vehicle's first stop (its portal sign-in URL), a tracking link to that stop's
//! shipment once the ERP has released it, and the console URL with the operator token.
//!
//! ```text
//! portal   {base}/portal/#token=<customer token>   (the fragment never reaches a server)
//! tracking {base}/t/<signed token>                  (48 h, no sign-in)
//! console  {base}/console/#token=<operator token>
//! ```

use std::time::Duration;

use serde_json::{Value, json};

use super::Http;
use super::plan;
use super::vehicle::VehicleCtx;
use crate::SimError;

/// Life of the demo's tracking link.
pub const LINK_TTL_S: u64 = 48 * 3600;

/// A customer's access to the portal.
#[derive(Debug, Clone)]
pub struct Customer {
    /// The ERP's customer id (`BAKKERIJ-JORDAAN`).
    pub id: String,
    /// The business's name.
    pub name: String,
    /// The shipment of the first round's first stop (as released: with the run's nonce).
    pub shipment_id: String,
    /// The portal API as that customer.
    pub api: Http,
}

/// Makes a customer credential for the business at `first`'s first stop of round 1.
pub async fn customer(ops: &Http, first: &VehicleCtx) -> Result<Customer, SimError> {
    let round = match &first.track {
        Some(t) => plan::round_on_track(t, first.seed, &first.id, first.index, 1),
        None => plan::round(first.seed, &first.id, first.index, 1),
    };
    let stop = round
        .stops
        .first()
        .ok_or_else(|| SimError::Hub("the first round has no stops".into()))?;
    let body = round.shipment(0, &first.id);
    let id = body["customer_id"].as_str().unwrap_or_default().to_string();
    let r = ops
        .client
        .post(format!("{}/v1/ops/credentials", ops.base))
        .bearer_auth(&ops.token)
        .json(&json!({"role": "customer", "name": format!("{} (demo)", stop.name), "customer_id": id}))
        .send()
        .await
        .map_err(|e| SimError::Hub(format!("making the customer credential: {e}")))?;
    let v: Value = r
        .json()
        .await
        .map_err(|e| SimError::Hub(format!("making the customer credential: {e}")))?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| SimError::Hub(format!("the hub made no customer credential: {v}")))?;
    Ok(Customer {
        id,
        name: stop.name.clone(),
        shipment_id: format!("{}-{}", stop.shipment_id, first.run_nonce),
        api: Http {
            token: token.to_string(),
            ..ops.clone()
        },
    })
}

/// The portal's sign-in URL for `c`.
pub fn portal_url(c: &Customer) -> String {
    format!("{}/portal/#token={}", c.api.base, c.api.token)
}

/// The console's sign-in URL.
pub fn console_url(ops: &Http) -> String {
    format!("{}/console/#token={}", ops.base, ops.token)
}

/// A tracking link to `c`'s shipment, once the ERP has released it (`wait` at most).
pub async fn tracking_link(c: &Customer, wait: Duration) -> Result<String, SimError> {
    let deadline = tokio::time::Instant::now() + wait;
    let path = format!("/v1/portal/shipments/{}/links", c.shipment_id);
    loop {
        let r = c
            .api
            .client
            .post(format!("{}{path}", c.api.base))
            .bearer_auth(&c.api.token)
            .json(&json!({"ttl_s": LINK_TTL_S}))
            .send()
            .await
            .map_err(|e| SimError::Hub(format!("POST {path}: {e}")))?;
        if r.status().is_success() {
            let v: Value = r
                .json()
                .await
                .map_err(|e| SimError::Hub(format!("POST {path}: {e}")))?;
            let url = v["url"]
                .as_str()
                .ok_or_else(|| SimError::Hub(format!("POST {path}: no url in {v}")))?;
            return Ok(format!("{}{url}", c.api.base));
        }
        // 404 until the vehicle's first round is released; 429 if asked too often.
        if tokio::time::Instant::now() > deadline {
            return Err(SimError::Hub(format!(
                "POST {path}: {} after {wait:?}",
                r.status()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
