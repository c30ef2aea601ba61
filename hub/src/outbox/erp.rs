//! The ERP connector: one [`super::worker::Worker`] per `[[erp]]`, delivering its outbox
//! rows as CloudEvents.
//!
//! ```text
//! POST {base_url}/events   Idempotency-Key: row id, X-Correlation-Id, traceparent
//!   2xx, 409             done (409: the ERP had applied it before)
//!   429, 503             again after Retry-After (seconds or an HTTP date)
//!   5xx, timeout,        again after a backoff with full jitter, capped
//!   connection error
//!   other 4xx            dead letter, with the ERP's answer kept
//! ```
//!
//! A row is given up after `max_attempts` or `max_age_s`.

use std::sync::Arc;
use std::time::Duration;

use fleetsync_protocol::json::Time;
use serde_json::{Value, json};

use super::worker::{Answer, Gate, Limits, Target, backoff_ms, reply};
use super::{Delivery, OutboxRow};
use crate::config::ErpConfig;
use crate::portal::links::{BlobClaims, Signer};
use crate::shipments::{FactType, Mappings};
use crate::store::Store;

/// The CloudEvents 1.0 message for a row.
pub fn message(row: &OutboxRow, mappings: &Mappings, evidence: Option<Value>) -> Value {
    let m = mappings.of(row.state);
    let kind = row.fact.kind.as_str().to_ascii_lowercase();
    let mut data = json!({
        "shipment_id": row.shipment_id,
        "reference": row.reference,
        "customer_id": row.customer_id,
        "milestone": row.fact.kind.as_str(),
        "classifier": row.fact.classifier,
        "stop_id": row.fact.stop_id,
        "state": row.state.as_str(),
        "erp_status": m.map(|m| m.erp_status.as_str()),
        "mapping_version": mappings.version,
        "fact_id": row.fact.id,
        "source": row.fact.source,
    });
    if row.fact.kind == FactType::PodConfirmed {
        data["billing_release"] = json!(m.is_some_and(|m| m.releases_billing));
        data["evidence"] = evidence.unwrap_or(Value::Null);
    }
    if row.fact.kind == FactType::Eta {
        data["eta"] = json!(row.fact.event_time);
    }
    json!({
        "specversion": "1.0",
        "id": row.id,
        "source": "fleetsync-hub",
        "type": format!("com.fleetsync.shipment.{kind}.v1"),
        "subject": row.shipment_id,
        "time": row.fact.event_time,
        "recordedtime": row.fact.recorded_time,
        "sequence": row.seq.to_string(),
        "correlationid": row.fact.id,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// A W3C `traceparent` derived from the row id (the same for every attempt of it).
pub fn traceparent(row_id: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(row_id.as_bytes());
    format!(
        "00-{}-{}-01",
        hex::encode(&h[..16]),
        hex::encode(&h[16..24])
    )
}

/// Where the POD evidence in outgoing messages points. The ERP reads it with its own
/// credential at `/v1/erp/blobs/{sha256}` (a link that lasts); a webhook partner has no
/// credential, so its links are `/p/<token>` URLs signed for that shipment's POD, which
/// expire (the portal's POD URLs). With `[http] public_url` the links are absolute.
#[derive(Debug, Clone)]
pub struct EvidenceLinks {
    base: String,
    signer: Arc<Signer>,
    ttl_s: u64,
}

impl EvidenceLinks {
    /// Links under `public_url` (none: paths), signed URLs valid `ttl_s`.
    pub fn new(public_url: Option<&str>, signer: Arc<Signer>, ttl_s: u64) -> Self {
        EvidenceLinks {
            base: public_url.unwrap_or("").trim_end_matches('/').to_string(),
            signer,
            ttl_s,
        }
    }

    /// The ERP's link to a blob.
    pub fn erp(&self, sha: &[u8; 32]) -> String {
        format!("{}/v1/erp/blobs/{}", self.base, hex::encode(sha))
    }

    /// A signed link to a blob of `shipment_id`'s POD, valid from `now_ms` for the TTL.
    pub fn signed(&self, shipment_id: &str, sha: &[u8; 32], now_ms: u64) -> String {
        let token = self.signer.blob(&BlobClaims {
            shipment_id: shipment_id.to_string(),
            sha256_hex: hex::encode(sha),
            exp_s: now_ms / 1000 + self.ttl_s,
        });
        format!("{}/p/{token}", self.base)
    }
}

/// The POD evidence of a POD_CONFIRMED row: the POD event's blobs, each linked by `url`.
pub(super) async fn evidence(
    store: &Store,
    row: &OutboxRow,
    url: impl Fn(&[u8; 32]) -> String,
) -> Option<Value> {
    // POD_CONFIRMED ids begin with the POD event's `device:epoch:seq`.
    let mut parts = row.fact.id.splitn(4, ':');
    let (device, epoch, seq) = (parts.next()?, parts.next()?, parts.next()?);
    let (epoch, seq) = (epoch.parse::<u32>().ok()?, seq.parse::<u64>().ok()?);
    let (captured, p) = crate::portal::view::pod_event(store, device, epoch, seq)
        .await
        .ok()??;
    Some(json!({
        "pod_id": p.pod_id.as_str(),
        "recipient_name": p.recipient_name.as_str(),
        "signature": p.signature.as_ref().map(|b| url(&b.sha256)),
        "photos": p.photos.iter().map(|b| url(&b.sha256)).collect::<Vec<_>>(),
        "captured": Time(captured),
    }))
}

/// One ERP's worker.
pub struct Connector {
    cfg: ErpConfig,
    auth: Option<String>,
    client: reqwest::Client,
    store: Store,
    mappings: Mappings,
    links: EvidenceLinks,
}

impl std::fmt::Debug for Connector {
    // Not the config: it may hold the ERP's credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("erp", &self.cfg.name)
            .field("base_url", &self.cfg.base_url)
            .finish()
    }
}

impl Connector {
    /// A connector for `cfg` (its client built now: a bad CA file is an error at start).
    pub fn new(
        cfg: ErpConfig,
        store: Store,
        mappings: Mappings,
        links: EvidenceLinks,
    ) -> Result<Self, String> {
        let auth = cfg.authorization().map_err(|e| e.to_string())?;
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(10_000)))
            .pool_max_idle_per_host(cfg.burst as usize);
        if let Some(ca) = &cfg.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("erp {:?}: ca {}: {e}", cfg.name, ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("erp {:?}: ca {}: {e}", cfg.name, ca.display()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b
            .build()
            .map_err(|e| format!("erp {:?}: HTTP client: {e}", cfg.name))?;
        Ok(Connector {
            cfg,
            auth,
            client,
            store,
            mappings,
            links,
        })
    }

    /// Its rate and breaker settings.
    pub fn limits(&self) -> Limits {
        Limits {
            rate_per_s: self.cfg.rate_per_s,
            burst: self.cfg.burst,
            timeout_ms: self.cfg.timeout_ms,
            breaker_failures: self.cfg.breaker_failures,
            breaker_open_ms: self.cfg.breaker_open_ms,
        }
    }
}

impl Target for Connector {
    fn sink(&self) -> &str {
        &self.cfg.name
    }

    async fn gate(&self) -> Gate {
        Gate::Open
    }

    async fn send(&self, row: &OutboxRow, now_ms: u64) -> Answer {
        let ev = if row.fact.kind == FactType::PodConfirmed {
            evidence(&self.store, row, |sha| self.links.erp(sha)).await
        } else {
            None
        };
        let body = message(row, &self.mappings, ev);
        let url = format!("{}/events", self.cfg.base_url.trim_end_matches('/'));
        let mut req = self
            .client
            .post(&url)
            .header("content-type", "application/cloudevents+json")
            .header("idempotency-key", &row.id)
            .header("x-correlation-id", &row.fact.id)
            .header("traceparent", traceparent(&row.id))
            .json(&body);
        if let Some(a) = &self.auth {
            req = req.header("authorization", a);
        }
        let (status, after, text) = match reply(req.send().await, now_ms, "the ERP").await {
            Ok(r) => r,
            Err(retry) => return retry,
        };
        if status.is_success() || status.as_u16() == 409 {
            return Answer::Applied;
        }
        match status.as_u16() {
            429 | 503 => Answer::Later(after, format!("HTTP {status}")),
            500..=599 => Answer::Later(None, format!("HTTP {status}: {text}")),
            _ => Answer::Refused(format!("HTTP {status}"), text),
        }
    }

    fn settle(&self, row: &OutboxRow, answer: Answer, now_ms: u64) -> Delivery {
        match answer {
            Answer::Applied => Delivery::Done,
            Answer::Refused(error, body) => Delivery::Dead {
                error,
                response: Some(body),
            },
            Answer::Later(after, error) => {
                let attempts = row.attempts + 1;
                let age_ms = now_ms.saturating_sub(row.created_ms);
                if attempts >= self.cfg.max_attempts || age_ms >= self.cfg.max_age_s * 1000 {
                    return Delivery::Dead {
                        error: format!("given up after {attempts} attempts: {error}"),
                        response: None,
                    };
                }
                let wait = after.unwrap_or_else(|| {
                    backoff_ms(row.attempts, self.cfg.backoff_ms, self.cfg.backoff_cap_ms)
                });
                Delivery::Retry {
                    next_ms: now_ms + wait,
                    error,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped_and_stable() {
        let t = traceparent("sap/S1/V1:1:7");
        assert_eq!(t, traceparent("sap/S1/V1:1:7"));
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}
