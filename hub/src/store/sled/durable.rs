//! What "durable" means for the hub's sled store, done incrementally.
//!
//! sled's `flush()` writes its log but on Linux only calls `sync_file_range`, which leaves
//! file metadata and the device cache. So after it, the files sled wrote are synced:
//!
//! - `db`, which every write appends to: `fdatasync` every round;
//! - `conf`, `snap.*` (written, then renamed into place) and `blobs/*` (values over sled's
//!   blob threshold, i.e. POD photos; written once, never synced by sled): synced when they
//!   appear or their length or mtime changed since their last sync, not every round, so a
//!   hub holding thousands of photos still does about one `fdatasync` per round;
//! - the directories, when the set of files in them changed (a rename or a new blob file
//!   is only durable once its directory entry is).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Each file's (length, mtime) at its last sync.
#[derive(Debug, Default)]
pub(super) struct Synced {
    files: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

/// Flushes sled, then syncs what changed in `dir` since the last successful call.
pub(super) fn make_durable(db: &sled::Db, dir: &Path, synced: &mut Synced) -> io::Result<()> {
    db.flush().map_err(io::Error::other)?;
    let blobs = dir.join("blobs");
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| named(dir, e))? {
        let entry = entry.map_err(|e| named(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            files.push(entry.path());
        }
    }
    match fs::read_dir(&blobs) {
        Ok(entries) => {
            for entry in entries {
                files.push(entry.map_err(|e| named(&blobs, e))?.path());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(&blobs, e)),
    }
    let mut now = HashMap::with_capacity(files.len());
    for path in files {
        // sled may remove an old snapshot or blob while we look: nothing to sync then.
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(named(&path, e)),
        };
        let stamp = (meta.len(), meta.modified().ok());
        let is_log = path.file_name().is_some_and(|n| n == "db");
        if is_log || synced.files.get(&path) != Some(&stamp) {
            match File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(named(&path, e)),
            }
        }
        now.insert(path, stamp);
    }
    let set_changed =
        now.len() != synced.files.len() || now.keys().any(|k| !synced.files.contains_key(k));
    if set_changed {
        sync_dir(&blobs)?;
        sync_dir(dir)?;
    }
    synced.files = now;
    Ok(())
}

/// fsyncs a directory; one that does not exist (no blob yet) needs no sync.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(named(dir, e)),
    }
}

/// The error with the path it concerns in its message.
fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The same cases as the agent's `store::commit` sync test: a vanished file is
    /// skipped, a file whose metadata cannot be read is an error naming it.
    #[test]
    fn sync_skips_vanished_files_and_fails_on_unreadable_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        db.insert(b"k", b"v").unwrap();
        let mut synced = Synced::default();
        make_durable(&db, dir.path(), &mut synced).unwrap();
        assert!(synced.files.keys().any(|p| p.ends_with("db")));
        // A snapshot that vanished: nothing to sync, not an error.
        let ghost = dir.path().join("snap.ghost");
        std::fs::write(&ghost, b"x").unwrap();
        make_durable(&db, dir.path(), &mut synced).unwrap();
        std::fs::remove_file(&ghost).unwrap();
        make_durable(&db, dir.path(), &mut synced).unwrap();
        assert!(!synced.files.contains_key(&ghost));
        // A snapshot whose metadata cannot be read (a symlink loop: ELOOP).
        std::os::unix::fs::symlink("snap.loop", dir.path().join("snap.loop")).unwrap();
        let err = make_durable(&db, dir.path(), &mut synced).unwrap_err();
        assert!(err.to_string().contains("snap.loop"), "{err}");
    }
}
