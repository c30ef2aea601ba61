//! POD blobs (signatures, photos) as files beside sled, awaiting the hub's `BlobAck`.
//!
//! A blob never sits whole in memory: the local API streams each multipart part into a
//! [`BlobWriter`] (a temporary file, hashed as it is written, its bytes reserved against
//! the quota as they arrive), [`BlobWriter::finish`] fsyncs it, and the POD's commit
//! renames it to its digest, fsyncs the directory and only then writes the blob's record
//! in the same sled transaction as the POD event. The uplink reads blobs back chunk by
//! chunk from the file ([`Store::open_blob`]).
//!
//! Invariants:
//! - A record in tree `pod_blobs` means its file is durable (renamed and the directory
//!   fsynced before the record's transaction).
//! - A file is deleted only after its record is removed (the hub's `BlobAck`), so on open
//!   a record without a file is a blob the hub already has: the record is dropped. While
//!   the store is open, a record whose file is gone or has the wrong length is damage
//!   from outside: [`Store::open_blob`] logs an error and drops it, so the blobs after it
//!   are still sent.
//! - A final file without a record (a crash between rename and commit, or a POD whose
//!   commit failed) and every temporary file are deleted on open; until then they are on
//!   disk and in the directory's size, but not in the logical figures.
//! - Bytes of uploads in progress are reserved in the quota (`State::inflight`) before
//!   they are written, so the store's directory never holds more than the quota allows
//!   even while uploads stream in.
//!
//! # On-disk layout (under [`super::StoreConfig::path`], beside sled's files)
//!
//! ```text
//! pod/{sha256 hex}          a pending blob's bytes (as uploaded)
//! pod/upload-{16 hex}.tmp   an upload in progress (deleted on open)
//! tree "pod_blobs" { sha256 (32 bytes) => len: u64 BE }
//! ```
//!
//! Stores written before this layout kept the bytes in sled's tree `blobs`; [`migrate`]
//! moves them to files on open.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use fleetsync_protocol::Sha256;
use sha2::Digest as _;

use super::{Core, Store, StoreError, commit};

/// The folder of blob files under the store's path.
pub(super) const DIR: &str = "pod";
/// Stored bytes of a blob's record (key + value) besides its file.
pub(super) const RECORD_LEN: u64 = 32 + 8;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file of blob `sha` under `dir` (the `pod` folder).
pub(super) fn file_path(dir: &Path, sha: &Sha256) -> PathBuf {
    dir.join(hex::encode(sha))
}

/// Bytes a blob of `len` bytes counts in the quota: its file and its record.
pub(super) fn counted(len: u64) -> u64 {
    len + RECORD_LEN
}

/// Opens the blob folder: creates it, deletes temporary and unrecorded files, drops records
/// whose file is gone (already acknowledged by the hub), moves blobs of the old layout out
/// of sled, and returns the pending blobs' count and counted bytes.
pub(super) fn open(
    path: &Path,
    db: &sled::Db,
    records: &sled::Tree,
) -> Result<(u64, u64), StoreError> {
    let dir = path.join(DIR);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    migrate(&dir, db, records)?;
    let mut count = 0u64;
    let mut bytes = 0u64;
    for item in records.iter() {
        let (k, v) = item?;
        let sha: Sha256 = k
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt("blob record key not 32 bytes".into()))?;
        let len = decode_len(&v)?;
        let file = file_path(&dir, &sha);
        match fs::metadata(&file) {
            Ok(m) if m.len() == len => {
                count += 1;
                bytes += counted(len);
            }
            Ok(m) => {
                // Renamed only after its fsync: a short file is damage from outside.
                tracing::error!(sha256 = %hex::encode(sha), expected = len, found = m.len(),
                    "store: POD blob file has the wrong length; dropping it");
                fs::remove_file(&file).map_err(io_err(&file))?;
                records.remove(k)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(sha256 = %hex::encode(sha),
                    "store: POD blob already deleted after the hub's ack; dropping its record");
                records.remove(k)?;
            }
            Err(e) => return Err(io_err(&file)(e)),
        }
    }
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let recorded = hex::decode(name.as_encoded_bytes())
            .ok()
            .and_then(|b| <Sha256>::try_from(b.as_slice()).ok())
            .map(|sha| records.contains_key(sha))
            .transpose()?
            .unwrap_or(false);
        if !recorded {
            tracing::debug!(file = ?name, "store: removing an unfinished upload");
            let p = entry.path();
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    commit::sync_path(&dir)?;
    Ok((count, bytes))
}

/// Moves blobs of the old layout (bytes in sled's tree `blobs`) to files, one at a time.
fn migrate(dir: &Path, db: &sled::Db, records: &sled::Tree) -> Result<(), StoreError> {
    if !db.tree_names().iter().any(|n| n.as_ref() == b"blobs") {
        return Ok(());
    }
    let old = db.open_tree("blobs")?;
    let mut moved = 0u64;
    for item in old.iter() {
        let (k, v) = item?;
        let sha: Sha256 = k
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt("blob key not 32 bytes".into()))?;
        let tmp = dir.join(format!(
            "upload-{}.tmp",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&v).map_err(io_err(&tmp))?;
        f.sync_data().map_err(io_err(&tmp))?;
        let fin = file_path(dir, &sha);
        fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
        commit::sync_path(dir)?;
        records.insert(k.clone(), &(v.len() as u64).to_be_bytes())?;
        old.remove(k)?;
        db.flush()?;
        moved += 1;
    }
    db.drop_tree("blobs")?;
    db.flush()?;
    if moved > 0 {
        tracing::info!(moved, "store: POD blobs moved from sled to files");
    }
    Ok(())
}

fn decode_len(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v.try_into().map_err(|_| {
        StoreError::Corrupt(format!("blob record of {} bytes, expected 8", v.len()))
    })?;
    Ok(u64::from_be_bytes(b))
}

/// An upload in progress: a temporary file, hashed as written. Dropping it deletes the file
/// and gives its reservation back.
pub struct BlobWriter {
    core: Arc<Core>,
    /// `None` once finished.
    tmp: Option<PathBuf>,
    file: File,
    hasher: sha2::Sha256,
    len: u64,
    /// Bytes reserved in the quota (`State::inflight`) and not yet handed on.
    reserved: u64,
}

/// A finished, fsynced upload awaiting its POD's commit. Dropping it (a POD refused)
/// deletes the file and gives its reservation back.
pub struct BlobFile {
    core: Arc<Core>,
    /// `None` once the commit has taken it.
    pub(super) tmp: Option<PathBuf>,
    /// The file's digest.
    pub sha256: Sha256,
    /// The file's length.
    pub len: u64,
    /// Bytes reserved in the quota, 0 once the commit has taken them.
    pub(super) reserved: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("tmp", &self.tmp)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BlobFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobFile")
            .field("sha256", &hex::encode(self.sha256))
            .field("len", &self.len)
            .field("tmp", &self.tmp)
            .finish_non_exhaustive()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
        self.core.release(std::mem::take(&mut self.reserved));
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
        self.core.release(std::mem::take(&mut self.reserved));
    }
}

impl Core {
    /// Gives back `n` bytes reserved by an upload (never under the state lock).
    fn release(&self, n: u64) {
        if n > 0 {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.inflight -= n;
        }
    }
}

impl Store {
    /// Starts an upload (a temporary file in the blob folder).
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let core = Arc::clone(&self.inner.core);
        let tmp = core.path.join(DIR).join(format!(
            "upload-{}.tmp",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(BlobWriter {
            core,
            tmp: Some(tmp),
            file,
            hasher: sha2::Sha256::new(),
            len: 0,
            reserved: 0,
        })
    }

    /// The pending blobs (awaiting the hub's `BlobAck`) with their lengths, in digest order.
    pub fn pending_blobs(&self) -> Result<Vec<(Sha256, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.core.blob_records.iter() {
            let (k, v) = item?;
            let sha: Sha256 = k
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("blob record key not 32 bytes".into()))?;
            out.push((sha, decode_len(&v)?));
        }
        Ok(out)
    }

    /// A pending blob's file and length, to be read chunk by chunk. `None` when it is not
    /// pending, and when its file is gone or not of its recorded length: the bytes are lost
    /// (a record is written only once its file is durable), so the blob is dropped
    /// ([`Self::drop_lost_blob`]) rather than tried again forever.
    pub fn open_blob(&self, sha: &Sha256) -> Result<Option<(File, u64)>, StoreError> {
        let core = &self.inner.core;
        let Some(v) = core.blob_records.get(sha)? else {
            return Ok(None);
        };
        let len = decode_len(&v)?;
        let p = file_path(&core.path.join(DIR), sha);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.drop_lost_blob(sha, "its file is gone")?;
                return Ok(None);
            }
            Err(e) => return Err(io_err(&p)(e)),
        };
        let found = f.metadata().map_err(io_err(&p))?.len();
        if found != len {
            let why = format!("its file has {found} bytes, its record {len}");
            self.drop_lost_blob(sha, &why)?;
            return Ok(None);
        }
        Ok(Some((f, len)))
    }

    /// Drops a pending blob whose bytes are lost (its file gone, or short when read):
    /// logs an error naming it and `why`, then removes its record and file like
    /// [`Self::remove_blob`]. Its POD event stays; the hub never gets this picture.
    pub fn drop_lost_blob(&self, sha: &Sha256, why: &str) -> Result<bool, StoreError> {
        tracing::error!(sha256 = %hex::encode(sha), why,
            "store: POD blob lost from the store's folder; dropping it and sending the others");
        self.remove_blob(sha)
    }

    /// Deletes a blob the hub has stored: its record (durable at the next commit round),
    /// then its file.
    pub fn remove_blob(&self, sha: &Sha256) -> Result<bool, StoreError> {
        let core = &self.inner.core;
        let mut st = core.state()?;
        let Some(v) = core.blob_records.remove(sha)? else {
            return Ok(false);
        };
        let len = decode_len(&v)?;
        st.blobs.events -= 1;
        st.blobs.bytes -= counted(len);
        core.commits.register();
        // Under the lock: a POD committing the same digest meanwhile renames its file
        // only after this.
        let p = file_path(&core.path.join(DIR), sha);
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io_err(&p)(e)),
        }
    }
}

impl BlobWriter {
    /// Appends `buf`: reserves its bytes in the quota first (thinning telemetry if needed;
    /// [`StoreError::QuotaFull`] when even that cannot make room), then writes and hashes.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let n = buf.len() as u64;
        {
            let mut st = self.core.state()?;
            self.core.make_room(&mut st, n)?;
            st.inflight += n;
        }
        self.reserved += n;
        self.len += n;
        self.hasher.update(buf);
        let tmp = self.tmp.as_deref().unwrap_or(Path::new(DIR));
        self.file.write_all(buf).map_err(io_err(tmp))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// fsyncs the file; the upload then awaits its POD's commit.
    pub fn finish(mut self) -> Result<BlobFile, StoreError> {
        let tmp = self.tmp.take().unwrap_or_default();
        if let Err(e) = self.file.sync_data() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        Ok(BlobFile {
            core: Arc::clone(&self.core),
            tmp: Some(tmp),
            sha256: self.hasher.clone().finalize().into(),
            len: self.len,
            reserved: std::mem::take(&mut self.reserved),
        })
    }
}
