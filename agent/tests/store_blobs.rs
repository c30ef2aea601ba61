//! POD blobs as files beside sled: a committed blob survives reopen as a file with its
//! record, uploads that never committed leave nothing after reopen, reservations count in
//! the quota while an upload streams, and a store of the old layout (blob bytes in sled's
//! tree `blobs`) is moved to files on open.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use fleetsync_agent::store::{StopPod, Store, StoreConfig, StoreError};
use fleetsync_protocol::{
    BlobRef, Body, BoundedString, BoundedVec, Event, Id, MediaType, Outcome, Pod, Sha256,
};
use sha2::Digest as _;

fn open(dir: &Path, quota: u64) -> Store {
    Store::open(StoreConfig {
        path: dir.to_path_buf(),
        quota_bytes: quota,
        space_factor: fleetsync_agent::store::SLED_SPACE_FACTOR,
        commit_interval: Duration::ZERO,
    })
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pod_event(photos: &[(Sha256, usize)]) -> Event {
    let refs: Vec<BlobRef> = photos
        .iter()
        .map(|(sha, len)| BlobRef {
            sha256: *sha,
            len: *len as u32,
            media: MediaType::Jpeg,
        })
        .collect();
    Event {
        time_ms: 1,
        body: Body::Pod(Pod {
            pod_id: Id::try_from_str("pod-1").unwrap(),
            shipment_id: Id::try_from_str("shp-1").unwrap(),
            stop_id: Id::try_from_str("s1").unwrap(),
            outcome: Outcome::Delivered,
            reason_code: None,
            recipient_name: BoundedString::try_from_str("A").unwrap(),
            notes: None,
            signature: None,
            photos: BoundedVec::try_from_slice(&refs).unwrap(),
            geo: None,
        }),
    }
}

fn stop() -> StopPod {
    StopPod {
        pod_id: "pod-1".into(),
        outcome: "delivered".into(),
        time_ms: 1,
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("pod"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn committed_blobs_are_files_that_survive_reopen_and_unfinished_uploads_vanish() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let photo = vec![0xabu8; 300_000];
    let sha: Sha256 = sha2::Sha256::digest(&photo).into();
    {
        let store = open(dir.path(), 1 << 24);
        let mut w = store.blob_writer().unwrap();
        for part in photo.chunks(70_000) {
            w.write(part).unwrap();
        }
        assert_eq!(
            store.stats().used_bytes,
            300_000,
            "an upload's bytes are reserved"
        );
        let f = w.finish().unwrap();
        assert_eq!(f.sha256, sha);
        rt.block_on(store.append_pod(
            pod_event(&[(sha, photo.len())]),
            vec![f],
            None,
            [0; 32],
            stop(),
        ))
        .unwrap();
        assert_eq!(store.pending_blobs().unwrap(), vec![(sha, 300_000)]);
        assert_eq!(store.stats().blobs.events, 1);
    }
    // What a kill -9 leaves of uploads that never committed: a temporary file, and a file
    // renamed to its digest whose record was never written.
    std::fs::write(dir.path().join("pod/upload-0123456789abcdef.tmp"), b"half").unwrap();
    std::fs::write(dir.path().join("pod").join(hex::encode([9u8; 32])), b"x").unwrap();
    let store = open(dir.path(), 1 << 24);
    assert_eq!(files_in(dir.path()), vec![hex::encode(sha)]);
    assert_eq!(store.pending_blobs().unwrap(), vec![(sha, 300_000)]);
    let (file, len) = store.open_blob(&sha).unwrap().unwrap();
    let mut back = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
    assert_eq!(back, photo);
    let used = store.stats().used_bytes;
    assert!(used > 300_000, "{used}");
    assert!(store.remove_blob(&sha).unwrap());
    assert!(files_in(dir.path()).is_empty());
    assert_eq!(store.stats().blobs.events, 0);
}

#[test]
fn an_upload_beyond_the_quota_is_refused_while_it_streams() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let mut w = store.blob_writer().unwrap();
    let block = vec![1u8; 256 * 1024];
    let mut refused = None;
    for _ in 0..8 {
        if let Err(e) = w.write(&block) {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(StoreError::QuotaFull { .. })),
        "{refused:?}"
    );
    assert!(w.len() <= 1 << 20);
    drop(w);
    assert_eq!(store.stats().used_bytes, 0, "the reservation is given back");
    assert!(
        files_in(dir.path()).is_empty(),
        "the upload's file is deleted"
    );
}

#[test]
fn blobs_of_the_old_layout_move_to_files_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let photo = vec![7u8; 50_000];
    let sha: Sha256 = sha2::Sha256::digest(&photo).into();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("blobs")
            .unwrap()
            .insert(sha, photo.as_slice())
            .unwrap();
        db.flush().unwrap();
    }
    // sled releases its lock asynchronously; the store retries.
    let store = open(dir.path(), 1 << 24);
    assert_eq!(store.pending_blobs().unwrap(), vec![(sha, 50_000)]);
    assert_eq!(files_in(dir.path()), vec![hex::encode(sha)]);
    assert_eq!(
        std::fs::read(dir.path().join("pod").join(hex::encode(sha))).unwrap(),
        photo
    );
    assert_eq!(store.stats().blobs.events, 1);
}
