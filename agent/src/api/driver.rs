//! The driver's endpoints: jobs, proof of delivery, exceptions.
//!
//! - `GET /v1/jobs`, `GET /v1/jobs/{stop}`: the assignment in force with each stop's state.
//! - `POST /v1/stops/{stop}/pod` (multipart): `outcome`, `reason_code` (unless delivered),
//!   `recipient_name` (unless refused), `notes`, `shipment_id` (when the stop has several),
//!   one `signature` (PNG or SVG) and up to [`MAX_PHOTOS`] `photo` files (JPEG, PNG, HEIC).
//!   Files are streamed to the store as they arrive (never whole in memory), checked as
//!   they come (sizes, types by their leading bytes); the POD's blobs are fsynced files
//!   and its event goes in one durable transaction with their records, and only then 201.
//!   At most [`MAX_POD_UPLOADS`] uploads at once: another is answered 503 with
//!   `Retry-After`. A repeated `Idempotency-Key` returns the first answer (its files are
//!   only hashed, not stored again). A body that stalls (no byte within the config's
//!   `api.body_timeout_ms`) or is not complete within [`MAX_UPLOAD_TIME`] is answered
//!   408, and its upload place, quota reservation and partial files are given back at
//!   once. Any other refusal once the body is being read reads the rest of it first
//!   (within the same deadlines), so the client gets the answer, not a reset connection.
//! - `POST /v1/exceptions`: `{code, text, stop_id?}` with `code` from [`EXCEPTION_CODES`].

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::multipart::Field;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fleetsync_protocol::json::{AssignmentJson, StopJson};
use fleetsync_protocol::limits::MAX_PHOTOS;
use fleetsync_protocol::{
    Assignment, BlobRef, Body, BoundedString, BoundedVec, Code, Event, Exception, Id, MediaType,
    Outcome, Pod, Point, Sha256, Stop,
};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{ApiError, ApiState};
use crate::store::{BlobFile, BlobWriter, PodStored, StopPod, Store, StoreError};

/// Largest single file of a POD.
pub const MAX_FILE_BYTES: usize = 8 * 1024 * 1024;
/// Largest POD request (all files and fields).
pub const MAX_POD_BYTES: usize = 24 * 1024 * 1024;
/// Largest text field of a POD (the event's own limits are smaller and named on refusal).
const MAX_TEXT_FIELD: usize = 64 * 1024;
/// POD uploads streaming at once; one more is answered 503 with `Retry-After`
/// ([`UPLOAD_RETRY_AFTER_S`]) instead of being held, so uploads cannot pile up in memory
/// or on disk.
pub const MAX_POD_UPLOADS: usize = 2;
/// Seconds a refused upload is told to wait.
pub const UPLOAD_RETRY_AFTER_S: u32 = 2;
/// Longest a POD request's body may take in all, however steadily it trickles in (a full
/// [`MAX_POD_BYTES`] at about 40 KiB/s); past it the request is answered 408 like a
/// stalled one, so an upload place is never held for longer.
pub const MAX_UPLOAD_TIME: Duration = Duration::from_secs(600);
/// Bytes of a file part gathered before they are written out: an upload holds this much
/// memory, not its file.
const UPLOAD_BLOCK: usize = 256 * 1024;
/// Exception codes the driver may report.
pub const EXCEPTION_CODES: [&str; 10] = [
    "road_closed",
    "vehicle_breakdown",
    "accident",
    "customer_absent",
    "address_not_found",
    "access_denied",
    "weather",
    "traffic_delay",
    "load_damaged",
    "other",
];

#[derive(Serialize)]
struct StopStateOut {
    #[serde(flatten)]
    stop: StopJson,
    /// `not_visited`, `arrived`, `departed`.
    state: String,
    pod: Option<StopPod>,
}

#[derive(Serialize)]
struct JobOut {
    id: String,
    version: u32,
    stops: Vec<StopStateOut>,
}

fn current(st: &ApiState) -> Result<Arc<Assignment>, ApiError> {
    st.assignment
        .borrow()
        .clone()
        .ok_or_else(|| ApiError::NotFound("no job assigned to this vehicle yet".into()))
}

fn stop_out(st: &ApiState, stop: &Stop) -> Result<StopStateOut, ApiError> {
    let json = AssignmentJson::from_assignment(&Assignment {
        id: Id::new(),
        version: 0,
        stops: BoundedVec::try_from_slice(std::slice::from_ref(stop))
            .map_err(|_| ApiError::Internal("stop".into()))?,
    });
    let stop_json = json
        .stops
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("stop".into()))?;
    Ok(StopStateOut {
        state: st.edge.stop_state(stop.id.as_str()).to_string(),
        pod: st.store.stop_pod(&stop.id)?,
        stop: stop_json,
    })
}

/// `GET /v1/jobs`
pub(super) async fn jobs(State(st): State<ApiState>) -> Result<Response, ApiError> {
    let a = current(&st)?;
    let stops = a
        .stops
        .iter()
        .map(|s| stop_out(&st, s))
        .collect::<Result<_, _>>()?;
    Ok(Json(JobOut {
        id: a.id.to_string(),
        version: a.version,
        stops,
    })
    .into_response())
}

/// `GET /v1/jobs/{stop}`
pub(super) async fn job_stop(
    State(st): State<ApiState>,
    Path(stop): Path<String>,
) -> Result<Response, ApiError> {
    let a = current(&st)?;
    let s = a
        .stops
        .iter()
        .find(|s| s.id.as_str() == stop)
        .ok_or_else(|| ApiError::NotFound(format!("stop {stop:?} is not in job {}", a.id)))?;
    Ok(Json(stop_out(&st, s)?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExceptionIn {
    code: String,
    text: String,
    #[serde(default)]
    stop_id: Option<String>,
}

/// `POST /v1/exceptions`
pub(super) async fn exception(
    State(st): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let e: ExceptionIn =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    if !EXCEPTION_CODES.contains(&e.code.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "code: {:?} is not one of {}",
            e.code,
            EXCEPTION_CODES.join(", ")
        )));
    }
    if let Some(stop) = &e.stop_id {
        let a = current(&st)?;
        if !a.stops.iter().any(|s| s.id.as_str() == stop) {
            return Err(ApiError::NotFound(format!(
                "stop_id: {stop:?} is not in job {}",
                a.id
            )));
        }
    }
    let ev = Event {
        time_ms: crate::now_ms(),
        body: Body::Exception(Exception {
            code: Code::try_from_str(&e.code)
                .map_err(|_| ApiError::BadRequest("code: too long".into()))?,
            text: BoundedString::try_from_str(&e.text).map_err(|_| {
                ApiError::BadRequest(format!(
                    "text: longer than {} bytes",
                    fleetsync_protocol::limits::MAX_TEXT_LEN
                ))
            })?,
            stop_id: e
                .stop_id
                .as_deref()
                .map(Id::try_from_str)
                .transpose()
                .map_err(|_| ApiError::BadRequest("stop_id: too long".into()))?,
        }),
    };
    let id = st.store.append(ev).await?;
    st.wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"epoch": id.epoch, "seq": id.seq})),
    )
        .into_response())
}

/// What a file's leading bytes say it is.
pub fn sniff(bytes: &[u8]) -> Option<MediaType> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some(MediaType::Png);
    }
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return Some(MediaType::Jpeg);
    }
    if bytes.len() >= 12
        && &bytes[4..8] == b"ftyp"
        && matches!(
            &bytes[8..12],
            b"heic" | b"heix" | b"mif1" | b"msf1" | b"hevc"
        )
    {
        return Some(MediaType::Heic);
    }
    let head = &bytes[..bytes.len().min(512)];
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start_matches('\u{feff}').trim_start();
    if (t.starts_with("<svg") || t.starts_with("<?xml")) && text.contains("<svg") {
        return Some(MediaType::Svg);
    }
    None
}

/// One file part of a POD, streamed to the store (or, for a replayed request, only hashed).
struct Upload {
    sha256: Sha256,
    len: u64,
    /// The finished upload; `None` when only hashed.
    file: Option<BlobFile>,
    media: MediaType,
}

impl Upload {
    fn blob_ref(&self) -> BlobRef {
        BlobRef {
            sha256: self.sha256,
            // At most MAX_FILE_BYTES.
            len: self.len as u32,
            media: self.media,
        }
    }
}

struct PodForm {
    outcome: Option<String>,
    reason_code: Option<String>,
    recipient_name: Option<String>,
    notes: Option<String>,
    shipment_id: Option<String>,
    signature: Option<Upload>,
    photos: Vec<Upload>,
}

fn bad(field: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("{field}: {why}"))
}

fn chunk_err(name: &str, e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        bad("body", format!("larger than {MAX_POD_BYTES} bytes"))
    } else {
        bad(name, format!("could not be read ({e})"))
    }
}

/// The deadlines of reading one request's body: each read within `per_read` (the config's
/// `api.body_timeout_ms`), the whole body by `deadline` ([`MAX_UPLOAD_TIME`] after the
/// request was taken up).
#[derive(Debug, Clone, Copy)]
struct BodyClock {
    per_read: Duration,
    deadline: tokio::time::Instant,
}

impl BodyClock {
    fn start(per_read: Duration) -> Self {
        BodyClock {
            per_read,
            deadline: tokio::time::Instant::now() + MAX_UPLOAD_TIME,
        }
    }

    /// Awaits one read of the body; 408 when it takes longer than either deadline allows.
    async fn read<T>(&self, f: impl Future<Output = T>) -> Result<T, ApiError> {
        let now = tokio::time::Instant::now();
        let until = (now + self.per_read).min(self.deadline);
        tokio::time::timeout_at(until, f).await.map_err(|_| {
            ApiError::Timeout(if until == self.deadline {
                format!(
                    "body: not complete within {} s; send the POD again",
                    MAX_UPLOAD_TIME.as_secs()
                )
            } else {
                format!(
                    "body: no bytes for {} ms; send the POD again",
                    self.per_read.as_millis()
                )
            })
        })
    }
}

/// Where a file part's bytes go.
enum Sink {
    /// A temporary file in the store (quota reserved as it grows).
    Store(BlobWriter),
    /// Only hashed: a replay of a stored POD needs its fingerprint, not its bytes again.
    Hash(sha2::Sha256),
}

impl Sink {
    /// Writes `buf` (handed back empty for reuse).
    async fn write(self, buf: Vec<u8>) -> Result<(Sink, Vec<u8>), ApiError> {
        match self {
            Sink::Store(mut w) => tokio::task::spawn_blocking(move || {
                w.write(&buf)?;
                let mut buf = buf;
                buf.clear();
                Ok::<_, StoreError>((Sink::Store(w), buf))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("upload task: {e}")))?
            .map_err(ApiError::from),
            Sink::Hash(mut h) => {
                h.update(&buf);
                let mut buf = buf;
                buf.clear();
                Ok((Sink::Hash(h), buf))
            }
        }
    }

    /// Ends the part: the digest and, when stored, the fsynced upload.
    async fn finish(self) -> Result<(Sha256, Option<BlobFile>), ApiError> {
        match self {
            Sink::Store(w) => {
                let f = tokio::task::spawn_blocking(move || w.finish())
                    .await
                    .map_err(|e| ApiError::Internal(format!("upload task: {e}")))??;
                Ok((f.sha256, Some(f)))
            }
            Sink::Hash(h) => Ok((h.finalize().into(), None)),
        }
    }
}

/// Streams one file part into `sink` in blocks of [`UPLOAD_BLOCK`] bytes, checks its type
/// by its leading bytes (`accept`) before anything of it is stored, and keeps the size
/// limits. `total` counts the request's bytes so far.
async fn stream_file(
    field: &mut Field<'_>,
    clock: &BodyClock,
    name: &str,
    mut sink: Sink,
    total: &mut usize,
    accept: impl Fn(MediaType) -> bool,
    expected: &str,
) -> Result<Upload, ApiError> {
    let mut buf = Vec::with_capacity(UPLOAD_BLOCK);
    let mut media = None;
    let mut len = 0usize;
    loop {
        let chunk = clock
            .read(field.chunk())
            .await?
            .map_err(|e| chunk_err(name, e))?;
        let end = chunk.is_none();
        if let Some(c) = chunk {
            len += c.len();
            *total += c.len();
            if len > MAX_FILE_BYTES {
                return Err(bad(name, format!("larger than {MAX_FILE_BYTES} bytes")));
            }
            if *total > MAX_POD_BYTES {
                return Err(bad(
                    "body",
                    format!("larger than {MAX_POD_BYTES} bytes in all"),
                ));
            }
            buf.extend_from_slice(&c);
        }
        if buf.len() >= UPLOAD_BLOCK || (end && !buf.is_empty()) {
            if media.is_none() {
                match sniff(&buf) {
                    Some(m) if accept(m) => media = Some(m),
                    _ => return Err(bad(name, format!("must be {expected}"))),
                }
            }
            (sink, buf) = sink.write(buf).await?;
        }
        if end {
            break;
        }
    }
    let media = media.ok_or_else(|| bad(name, format!("must be {expected}")))?;
    let (sha256, file) = sink.finish().await?;
    Ok(Upload {
        sha256,
        len: len as u64,
        file,
        media,
    })
}

/// Reads the form, streaming files into the store (`store`) or only hashing them (`None`),
/// each read of the body within `clock`'s deadlines.
async fn read_form(
    mp: &mut Multipart,
    clock: &BodyClock,
    store: Option<&Store>,
) -> Result<PodForm, ApiError> {
    let mut f = PodForm {
        outcome: None,
        reason_code: None,
        recipient_name: None,
        notes: None,
        shipment_id: None,
        signature: None,
        photos: Vec::new(),
    };
    let mut total = 0usize;
    let sink = || -> Result<Sink, ApiError> {
        Ok(match store {
            Some(s) => Sink::Store(s.blob_writer()?),
            None => Sink::Hash(sha2::Sha256::new()),
        })
    };
    while let Some(mut field) = clock
        .read(mp.next_field())
        .await?
        .map_err(|e| bad("body", format!("not valid multipart ({e})")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "signature" => {
                if f.signature.is_some() {
                    return Err(bad("signature", "only one signature per POD"));
                }
                let accept = |m| matches!(m, MediaType::Png | MediaType::Svg);
                let u = stream_file(
                    &mut field,
                    clock,
                    &name,
                    sink()?,
                    &mut total,
                    accept,
                    "a PNG or SVG image",
                )
                .await?;
                f.signature = Some(u);
                continue;
            }
            "photo" => {
                if f.photos.len() >= MAX_PHOTOS {
                    return Err(bad("photo", format!("at most {MAX_PHOTOS} photos")));
                }
                let accept = |m| matches!(m, MediaType::Jpeg | MediaType::Png | MediaType::Heic);
                let u = stream_file(
                    &mut field,
                    clock,
                    &name,
                    sink()?,
                    &mut total,
                    accept,
                    "a JPEG, PNG or HEIC image",
                )
                .await?;
                f.photos.push(u);
                continue;
            }
            "outcome" | "reason_code" | "recipient_name" | "notes" | "shipment_id" => {}
            other => {
                return Err(bad(
                    other,
                    "unknown field; expected outcome, reason_code, recipient_name, notes, shipment_id, signature, photo",
                ));
            }
        }
        let mut data = Vec::new();
        while let Some(chunk) = clock
            .read(field.chunk())
            .await?
            .map_err(|e| chunk_err(&name, e))?
        {
            data.extend_from_slice(&chunk);
            total += chunk.len();
            if data.len() > MAX_TEXT_FIELD {
                return Err(bad(&name, format!("longer than {MAX_TEXT_FIELD} bytes")));
            }
        }
        let text = String::from_utf8(data).map_err(|_| bad(&name, "not UTF-8 text"))?;
        match name.as_str() {
            "outcome" => f.outcome = Some(text),
            "reason_code" => f.reason_code = Some(text),
            "recipient_name" => f.recipient_name = Some(text),
            "notes" => f.notes = Some(text),
            _ => f.shipment_id = Some(text),
        }
    }
    Ok(f)
}

/// Reads and discards the rest of a request's body (within `clock`'s deadlines), so a
/// client that sent it without waiting for `100 Continue` reads the answer instead of a
/// reset connection. Stops at the first error: what is left then is hyper's to close.
async fn drain(mp: &mut Multipart, clock: &BodyClock) {
    while let Ok(Ok(Some(mut field))) = clock.read(mp.next_field()).await {
        while let Ok(Ok(Some(_))) = clock.read(field.chunk()).await {}
    }
}

#[derive(Serialize)]
struct PodCreated {
    pod_id: String,
    epoch: u32,
    seq: u64,
}

/// `POST /v1/stops/{stop}/pod`
pub(super) async fn pod(
    State(st): State<ApiState>,
    Path(stop_id): Path<String>,
    headers: HeaderMap,
    mut mp: Multipart,
) -> Result<Response, ApiError> {
    let idem = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| bad("Idempotency-Key", "must be printable ASCII"))?;
            if k.is_empty() || k.len() > 128 {
                return Err(bad("Idempotency-Key", "must be 1 to 128 characters"));
            }
            Some(k.to_string())
        }
        None => None,
    };
    let a = current(&st)?;
    let stop = a
        .stops
        .iter()
        .find(|s| s.id.as_str() == stop_id)
        .ok_or_else(|| ApiError::NotFound(format!("stop {stop_id:?} is not in job {}", a.id)))?
        .clone();
    let clock = BodyClock::start(st.body_timeout);
    let Ok(_permit) = Arc::clone(&st.pod_uploads).try_acquire_owned() else {
        let waiting = headers
            .get(axum::http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waiting {
            drain(&mut mp, &clock).await;
        }
        return Err(ApiError::Busy {
            message: format!(
                "{MAX_POD_UPLOADS} POD uploads are in progress; send this one again in \
                 {UPLOAD_RETRY_AFTER_S} s"
            ),
            retry_after_s: UPLOAD_RETRY_AFTER_S,
        });
    };
    let r = take_pod(&st, &stop_id, &stop, idem, &mut mp, &clock).await;
    if let Err(e) = &r
        && !matches!(e, ApiError::Timeout(_))
    {
        // Refused part-way (a bad part, the quota): the rest of the body is read, with
        // the upload place still held, so the client reads this answer. Its files are
        // already deleted and their reservations given back. A stalled client is not
        // waited for again.
        drain(&mut mp, &clock).await;
    }
    r
}

/// The POD of `pod` once its upload place is held: reads the form, checks it and stores it.
async fn take_pod(
    st: &ApiState,
    stop_id: &str,
    stop: &Stop,
    idem: Option<String>,
    mp: &mut Multipart,
    clock: &BodyClock,
) -> Result<Response, ApiError> {
    // A key already answered: its files are only hashed, to check the replay matches.
    let replay = match &idem {
        Some(k) => st.store.pod_by_key(k)?.is_some(),
        None => false,
    };
    let form = read_form(mp, clock, (!replay).then_some(&st.store)).await?;

    let outcome = match form.outcome.as_deref() {
        Some("delivered") => Outcome::Delivered,
        Some("refused") => Outcome::Refused,
        Some("damaged") => Outcome::Damaged,
        Some("partial") => Outcome::Partial,
        Some(o) => {
            return Err(bad(
                "outcome",
                format!("{o:?} is not one of delivered, refused, damaged, partial"),
            ));
        }
        None => {
            return Err(bad(
                "outcome",
                "required: delivered, refused, damaged or partial",
            ));
        }
    };
    let reason = form.reason_code.filter(|r| !r.trim().is_empty());
    if outcome != Outcome::Delivered && reason.is_none() {
        return Err(bad(
            "reason_code",
            "required unless the outcome is delivered",
        ));
    }
    let recipient = form.recipient_name.unwrap_or_default();
    if outcome != Outcome::Refused && recipient.trim().is_empty() {
        return Err(bad(
            "recipient_name",
            "required unless the outcome is refused",
        ));
    }
    let shipment = match (form.shipment_id, stop.shipment_ids.len()) {
        (Some(s), _) if stop.shipment_ids.iter().any(|x| x.as_str() == s) => s,
        (Some(s), _) => {
            return Err(bad(
                "shipment_id",
                format!("{s:?} is not a shipment of stop {stop_id}"),
            ));
        }
        (None, 1) => stop.shipment_ids[0].to_string(),
        (None, 0) => {
            return Err(bad(
                "shipment_id",
                format!("stop {stop_id} lists no shipments; give shipment_id"),
            ));
        }
        (None, _) => {
            return Err(bad(
                "shipment_id",
                format!("stop {stop_id} has several shipments; say which"),
            ));
        }
    };

    // The request's fingerprint: what a replay with the same key must match.
    let mut fp = sha2::Sha256::new();
    for part in [
        stop_id,
        form.outcome.as_deref().unwrap_or(""),
        reason.as_deref().unwrap_or(""),
        &recipient,
        form.notes.as_deref().unwrap_or(""),
        &shipment,
    ] {
        fp.update((part.len() as u64).to_be_bytes());
        fp.update(part.as_bytes());
    }
    let signature = form.signature.as_ref().map(Upload::blob_ref);
    let photos: Vec<BlobRef> = form.photos.iter().map(Upload::blob_ref).collect();
    for u in form.signature.iter().chain(&form.photos) {
        fp.update(u.sha256);
    }
    let fingerprint: [u8; 32] = fp.finalize().into();
    let files: Vec<BlobFile> = form
        .signature
        .into_iter()
        .chain(form.photos)
        .filter_map(|u| u.file)
        .collect();

    // One POD at a time: an idempotency key is checked and stored without a race.
    let _guard = st.pod_lock.lock().await;
    if let Some(k) = &idem
        && let Some(prev) = st.store.pod_by_key(k)?
    {
        if prev.fingerprint != fingerprint {
            return Err(ApiError::Unprocessable(
                "Idempotency-Key: already used for a different POD; use a new key for a new POD"
                    .into(),
            ));
        }
        // The first request may still be in its commit (or have failed it): answer only
        // once what it stored is durable.
        st.store.sync().await?;
        return Ok(created(&prev, true));
    }
    if replay {
        // Idempotency answers are never removed, so the key found above is still there.
        return Err(ApiError::Internal("POD idempotency answer vanished".into()));
    }
    let now = crate::now_ms();
    let pod_id = format!(
        "pod-{}-{}",
        st.store.epoch(),
        hex::encode(rand::random::<[u8; 6]>())
    );
    let geo = st.edge.last_fix().map(|(_, f)| Point {
        lat_e7: f.lat_e7,
        lon_e7: f.lon_e7,
    });
    let long = |field: &str, max: usize| bad(field, format!("longer than {max} bytes"));
    let ev = Event {
        time_ms: now,
        body: Body::Pod(Pod {
            pod_id: Id::try_from_str(&pod_id).map_err(|_| ApiError::Internal("pod id".into()))?,
            shipment_id: Id::try_from_str(&shipment).map_err(|_| long("shipment_id", 64))?,
            stop_id: stop.id.clone(),
            outcome,
            reason_code: reason
                .as_deref()
                .map(Code::try_from_str)
                .transpose()
                .map_err(|_| long("reason_code", 32))?,
            recipient_name: BoundedString::try_from_str(&recipient)
                .map_err(|_| long("recipient_name", 128))?,
            notes: form
                .notes
                .as_deref()
                .map(BoundedString::try_from_str)
                .transpose()
                .map_err(|_| long("notes", 512))?,
            signature,
            photos: BoundedVec::try_from_slice(&photos).map_err(|_| bad("photo", "too many"))?,
            geo,
        }),
    };
    let outcome_name = form.outcome.unwrap_or_default();
    let stored = st
        .store
        .append_pod(
            ev,
            files,
            idem.as_deref(),
            fingerprint,
            StopPod {
                pod_id,
                outcome: outcome_name,
                time_ms: now,
            },
        )
        .await?;
    st.wake.notify_one();
    Ok(created(&stored, false))
}

fn created(p: &PodStored, replayed: bool) -> Response {
    let mut r = (
        StatusCode::CREATED,
        Json(PodCreated {
            pod_id: p.pod_id.clone(),
            epoch: p.epoch,
            seq: p.seq,
        }),
    )
        .into_response();
    if replayed {
        r.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    r
}
