//! The queue's durable storage: an append-only log of records in segment files, written by one
//! committer thread with group commit.
//!
//! # Format
//! `DIR/log/<16 hex digits>.seg`, numbered in write order. A segment starts with a 16-byte
//! header (`MXPODSEG`, version 2; version 1 is read alike) followed by records:
//!
//! ```text
//! 0  magic "MXR1"     4  kind (1 message, 2 state, 3 remove)   5  3 zero bytes
//! 8  meta_len u32     12 body_len u64    20 body_crc u32    24 head_crc u32   28 4 zero bytes
//! 32 meta (JSON)      32+meta_len body
//! ```
//! `head_crc` covers bytes 0..24 and the meta; `body_crc` the body. A message record carries the
//! envelope and the body; a state record a [`MessageState`] snapshot; a remove record ends a
//! message (delivered, bounced or deleted).
//!
//! `DIR/log/MANIFEST` lists the segments that exist: rewritten durably after a segment is
//! created and before one is deleted, so a listed segment that is not on disk was lost, not
//! collected. Version 2 means "the directory keeps a manifest"; a version-1 directory gets one at
//! its first start.
//!
//! # Guarantees
//! - [`Store::append`] resolves only after the record and everything before it are on disk
//!   (`fdatasync`, and the directory fsync'd after a new segment is created). Concurrent
//!   appends share one write and one `fdatasync`: throughput follows disk bandwidth, not fsync
//!   latency.
//! - A crash can leave a torn record only at the end of the newest segment: records after the
//!   last `fdatasync` were never acknowledged. Recovery cuts such a *tail* (a damaged end that
//!   no valid record follows) off, and never appends to an old segment: each start opens a new
//!   one.
//! - Records are self-delimiting: after one that fails its checks, recovery resynchronises at
//!   the next valid record header, so one damaged record costs one message. Envelopes readable
//!   in the damaged stretch come back as damaged messages (unreadable body: bounced, never
//!   delivered). Damage is recorded in the [`DamageLog`] and its segment kept until repaired.
//! - A body is checked against its CRC when read for delivery, so a damaged message is never
//!   delivered in part.
//! - A segment file is deleted only when nothing in it is needed: no live message's body or
//!   latest state, and no remove record whose message body still exists in an older segment
//!   (otherwise the message would come back after a restart). Deletions are made durable
//!   (directory fsync) before the records that depended on them are released.
//!
//! # Errors
//! A failed write or sync (a full disk, say) fails every append of that batch; the segment is
//! cut back to its last good length so it stays readable, and the committer goes on serving.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{
    damage::{Damage, DamageKind, DamageLog, segment_name},
    message::{Envelope, MessageState, QueueId},
};

const SEGMENT_MAGIC: &[u8; 8] = b"MXPODSEG";
/// Version 2: same records as version 1; the directory keeps `log/MANIFEST`. Both are read.
const SEGMENT_VERSION: u32 = 2;
const SEGMENT_HEADER_LEN: u64 = 16;
const RECORD_MAGIC: &[u8; 4] = b"MXR1";
const RECORD_HEADER_LEN: usize = 32;
/// Op kind that writes nothing: answered once everything before it is durable.
const BARRIER: u8 = 0;
const MAX_META_LEN: usize = 16 << 20;
/// At most this much of a damaged region is searched for envelopes.
const MAX_SALVAGE_BYTES: u64 = 64 << 20;
/// Upper bound on bytes gathered into one write.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// The batch buffer is shrunk back to this after a larger batch.
const RETAINED_BATCH_BUFFER: usize = 1 << 20;
/// A fully dead active segment larger than this is rotated so it can be deleted.
const ROTATE_DEAD_ACTIVE_AT: u64 = 1 << 20;

/// A storage error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("queue storage is full: {0}")]
    Full(String),
    #[error("queue storage I/O error: {0}")]
    Io(String),
    #[error("record {0} is corrupt: {1}")]
    Corrupt(QueueId, String),
    #[error("queue store is closed")]
    Closed,
}

impl StoreError {
    fn from_io(e: &io::Error) -> Self {
        // ENOSPC, EDQUOT (see `is_out_of_space`), and EFBIG: the file may not grow either
        if is_out_of_space(e) || e.kind() == io::ErrorKind::FileTooLarge {
            StoreError::Full(e.to_string())
        } else {
            StoreError::Io(e.to_string())
        }
    }
}

/// Where a message body lies in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    /// The record failed its checks at recovery: the body is never read (and never delivered),
    /// the message only goes to `corrupt/` with a DSN.
    pub unreadable: bool,
}

/// Position of a record in the log: the arrival order of messages.
pub type LogPos = (u64, u64);

/// What an append writes.
#[derive(Debug)]
pub enum Record {
    Message { envelope: Envelope, body: Vec<u8> },
    State(MessageState),
    Remove(QueueId),
}

impl Record {
    fn kind(&self) -> u8 {
        match self {
            Record::Message { .. } => 1,
            Record::State(_) => 2,
            Record::Remove(_) => 3,
        }
    }

    fn id(&self) -> QueueId {
        match self {
            Record::Message { envelope, .. } => envelope.id,
            Record::State(s) => s.id,
            Record::Remove(id) => *id,
        }
    }

    /// Serializes the record (header, meta, body); also returns where the body starts in it.
    fn encode(&self) -> (Vec<u8>, usize) {
        let (meta, body): (Vec<u8>, &[u8]) = match self {
            Record::Message { envelope, body } => (
                serde_json::to_vec(envelope).expect("envelope serializes"),
                body,
            ),
            Record::State(s) => (serde_json::to_vec(s).expect("state serializes"), &[]),
            Record::Remove(id) => (serde_json::to_vec(id).expect("id serializes"), &[]),
        };
        let mut out = Vec::with_capacity(RECORD_HEADER_LEN + meta.len() + body.len());
        out.extend_from_slice(RECORD_MAGIC);
        out.push(self.kind());
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&out[..24]);
        h.update(&meta);
        out.extend_from_slice(&h.finalize().to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&meta);
        let body_at = out.len();
        out.extend_from_slice(body);
        (out, body_at)
    }
}

/// A record that was written: where, and for messages, where its body is.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub pos: LogPos,
    pub body: Option<BodyRef>,
}

/// A live message found by recovery.
#[derive(Debug)]
pub struct Recovered {
    pub envelope: Envelope,
    pub body: BodyRef,
    pub pos: LogPos,
    /// Why the message cannot be delivered: its record was damaged (the envelope was read from
    /// it all the same). Such a message goes to `corrupt/` and its sender gets a DSN.
    pub damaged: Option<String>,
}

/// What recovery found and did, for the start-up log line.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: usize,
    /// Damaged ends of the newest segment cut off (unacknowledged writes).
    pub torn_tails: usize,
    /// Segments the manifest lists that are not on disk.
    pub missing_segments: Vec<u64>,
    /// Damage found at this start (not already listed in `damage.json`).
    pub damage: Vec<Damage>,
}

struct Op {
    record: Vec<u8>,
    kind: u8,
    id: QueueId,
    /// Offset of the body within the encoded record (messages only).
    body_at: Option<(usize, u64, u32)>,
    done: Option<oneshot::Sender<Result<Appended, StoreError>>>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::UnboundedSender<Op>,
    log_dir: Arc<PathBuf>,
    disk_bytes: Arc<AtomicU64>,
    damage: Arc<Mutex<DamageLog>>,
}

impl Store {
    /// Opens (creating when missing) the store under `dir`, recovers live messages and starts
    /// the committer thread. Fails with a clear error when `dir` cannot be written.
    /// `lock` is the directory's lock: the committer thread holds it until its last write.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        lock: super::lock::DirLock,
    ) -> Result<(Store, Vec<Recovered>, RecoveryReport), StoreError> {
        let log_dir = dir.join("log");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&log_dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", log_dir.display())))?;
        let probe = log_dir.join(".write-test");
        fs::write(&probe, b"ok")
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| {
                StoreError::Io(format!(
                    "queue directory {} is not writable: {e}",
                    dir.display()
                ))
            })?;
        let mut damage = DamageLog::load(dir);
        let (state, recovered, report) = recover(&log_dir, &mut damage)?;
        // before the new manifest (which no longer lists missing segments) is written
        if !report.damage.is_empty() {
            damage.save_or_log();
        }
        let damage = Arc::new(Mutex::new(damage));
        let disk_bytes = Arc::new(AtomicU64::new(0));
        let mut committer = Committer::start(
            log_dir.clone(),
            segment_size,
            state,
            disk_bytes.clone(),
            damage.clone(),
        )?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("queue-committer".into())
            .spawn(move || {
                let _lock = lock;
                committer.run(rx)
            })
            .map_err(|e| StoreError::Io(format!("cannot start committer: {e}")))?;
        Ok((
            Store {
                tx,
                log_dir: Arc::new(log_dir),
                disk_bytes,
                damage,
            },
            recovered,
            report,
        ))
    }

    /// Appends a record; resolves once it is durable.
    pub async fn append(&self, record: Record) -> Result<Appended, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(record, Some(done))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Appends a record without waiting: it is made durable with the next batch. Used for state
    /// changes whose loss in a crash only means a repeated delivery attempt.
    pub fn append_nowait(&self, record: Record) -> Result<(), StoreError> {
        self.send(record, None)
    }

    fn send(
        &self,
        record: Record,
        done: Option<oneshot::Sender<Result<Appended, StoreError>>>,
    ) -> Result<(), StoreError> {
        let kind = record.kind();
        let id = record.id();
        let (encoded, at) = record.encode();
        let body_at = match &record {
            Record::Message { body, .. } => Some((at, body.len() as u64, crc32fast::hash(body))),
            _ => None,
        };
        self.tx
            .send(Op {
                record: encoded,
                kind,
                id,
                body_at,
                done,
            })
            .map_err(|_| StoreError::Closed)
    }

    /// Reads a message body and checks its CRC: a damaged body is an error, never half a message.
    /// A checksum mismatch is recorded as damage (the segment is then kept until repaired).
    pub fn read_body(&self, id: QueueId, body: BodyRef) -> Result<Vec<u8>, StoreError> {
        if body.unreadable {
            return Err(StoreError::Corrupt(
                id,
                format!(
                    "its record in {} failed its checks",
                    segment_name(body.segment)
                ),
            ));
        }
        let path = segment_path(&self.log_dir, body.segment);
        let file = File::open(&path)
            .map_err(|e| StoreError::Corrupt(id, format!("cannot open {}: {e}", path.display())))?;
        let mut buf = vec![0u8; body.len as usize];
        file.read_exact_at(&mut buf, body.offset)
            .map_err(|e| StoreError::Corrupt(id, format!("cannot read body: {e}")))?;
        if crc32fast::hash(&buf) != body.crc {
            let mut d = Damage::new(
                DamageKind::BodyChecksum,
                Some(body.segment),
                "body checksum mismatch when read for delivery",
            )
            .at(body.offset, body.len);
            d.messages.push(id);
            let mut log = self.damage();
            if log.add(d) {
                log.save_or_log();
            }
            return Err(StoreError::Corrupt(id, "body checksum mismatch".into()));
        }
        Ok(buf)
    }

    /// The damage list (shared with the committer, which keeps damaged segments).
    pub fn damage(&self) -> MutexGuard<'_, DamageLog> {
        self.damage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes the log's segment files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Waits until every append sent before this call is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Op {
                record: Vec::new(),
                kind: BARRIER,
                id: QueueId(0),
                body_at: None,
                done: Some(done),
            })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?.map(|_| ())
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(segment_name(n))
}

/// Reference counts that decide when a segment may be deleted.
#[derive(Default)]
struct GcState {
    /// live message -> (body segment, latest state segment)
    live: HashMap<QueueId, (u64, Option<u64>)>,
    /// segment -> number of things that keep it
    refs: BTreeMap<u64, u64>,
    /// body segment -> segments holding remove records that must outlive it
    tomb_deps: HashMap<u64, Vec<u64>>,
    /// segment -> file size
    sizes: BTreeMap<u64, u64>,
}

impl GcState {
    fn incr(&mut self, seg: u64) {
        *self.refs.entry(seg).or_default() += 1;
    }
    fn decr(&mut self, seg: u64) {
        if let Some(n) = self.refs.get_mut(&seg) {
            *n = n.saturating_sub(1);
        }
    }

    /// Accounts one record found in (or written to) `seg`.
    fn apply(&mut self, seg: u64, kind: u8, id: QueueId) {
        match kind {
            1 => {
                self.live.insert(id, (seg, None));
                self.incr(seg);
            }
            2 => {
                if let Some((_, latest)) = self.live.get_mut(&id) {
                    let old = latest.replace(seg);
                    self.incr(seg);
                    if let Some(old) = old {
                        self.decr(old);
                    }
                }
            }
            3 => {
                if let Some((body, latest)) = self.live.remove(&id) {
                    self.decr(body);
                    if let Some(l) = latest {
                        self.decr(l);
                    }
                    // the remove record must stay while the body's (older) segment exists; in
                    // the body's own segment both go together
                    if body != seg {
                        self.incr(seg);
                        self.tomb_deps.entry(body).or_default().push(seg);
                    }
                }
            }
            _ => {}
        }
    }

    /// Segments other than `active` and the `pinned` (damaged) ones that nothing keeps.
    fn deletable(&self, active: u64, pinned: &BTreeSet<u64>) -> Vec<u64> {
        self.sizes
            .keys()
            .copied()
            .filter(|s| {
                *s != active && !pinned.contains(s) && self.refs.get(s).copied().unwrap_or(0) == 0
            })
            .collect()
    }

    /// Forgets deleted segments and releases the remove records that depended on them.
    fn forget(&mut self, segs: &[u64]) {
        for s in segs {
            self.sizes.remove(s);
            self.refs.remove(s);
            if let Some(deps) = self.tomb_deps.remove(s) {
                for t in deps {
                    self.decr(t);
                }
            }
        }
    }
}

/// One record of a segment, as [`records`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    pub offset: u64,
    /// 1 message, 2 state, 3 remove.
    pub kind: u8,
    pub meta_len: u64,
    pub body_len: u64,
    pub id: Option<QueueId>,
}

/// The valid records of a segment file, in order (damaged stretches skipped): for inspecting a
/// segment, and for tests that damage one record on purpose.
pub fn records(path: &Path) -> Result<Vec<RecordInfo>, StoreError> {
    #[derive(Deserialize)]
    struct WithId {
        id: QueueId,
    }
    let mut out = Vec::new();
    read_segment(path, 0, false, |item| {
        if let Item::Record {
            pos,
            kind,
            meta,
            body,
        } = item
        {
            let id = match kind {
                3 => serde_json::from_slice::<QueueId>(meta).ok(),
                _ => serde_json::from_slice::<WithId>(meta).ok().map(|w| w.id),
            };
            out.push(RecordInfo {
                offset: pos.1,
                kind,
                meta_len: meta.len() as u64,
                body_len: body.map_or(0, |b| b.len),
                id,
            });
        }
        Ok(())
    })?;
    Ok(out)
}

/// The manifest: `log/MANIFEST` lists the segments that exist. It is rewritten (temporary file,
/// fsync, rename, directory fsync) after a segment is created and before one is deleted, so a
/// segment it lists that is not on disk was lost, not collected.
pub const MANIFEST: &str = "MANIFEST";

#[derive(Serialize, Deserialize)]
struct Manifest {
    version: u32,
    segments: Vec<String>,
}

/// What recovery found of the manifest.
enum ManifestState {
    /// Never written (a new directory, or one written by a version without it) or deleted.
    Absent,
    Unreadable(String),
    Listed(BTreeSet<u64>),
}

/// Whether `DIR/log/MANIFEST` exists: the directory was run by a version that keeps a manifest
/// and `holds.json` (so a missing `holds.json` was deleted, not never written).
pub fn manifest_exists(dir: &Path) -> bool {
    dir.join("log").join(MANIFEST).exists()
}

fn read_manifest(log_dir: &Path) -> ManifestState {
    let path = log_dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return ManifestState::Absent,
        Err(e) => return ManifestState::Unreadable(e.to_string()),
    };
    let m: Manifest = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => return ManifestState::Unreadable(e.to_string()),
    };
    let mut set = BTreeSet::new();
    for name in &m.segments {
        match name
            .strip_suffix(".seg")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        {
            Some(n) => {
                set.insert(n);
            }
            None => return ManifestState::Unreadable(format!("{name:?} is not a segment name")),
        }
    }
    ManifestState::Listed(set)
}

/// Replaces the manifest with `segments`, durably.
///
/// On a full disk the temporary file cannot be written, yet the GC must still delete finished
/// segments to free the space (or the queue stays full for good). A shorter list then
/// overwrites the manifest in place, padded with spaces to its old length, so no new block is
/// needed. A crash in the middle of that one small write at worst leaves an unreadable manifest,
/// which recovery reports and rebuilds from the segments on disk; it never makes a deleted
/// segment look present.
fn write_manifest(
    log_dir: &Path,
    dir_handle: &File,
    segments: impl Iterator<Item = u64>,
) -> io::Result<()> {
    let m = Manifest {
        version: 1,
        segments: segments.map(segment_name).collect(),
    };
    let bytes = serde_json::to_vec(&m).expect("manifest serializes");
    let tmp = log_dir.join(format!("{MANIFEST}.tmp"));
    let replaced = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, log_dir.join(MANIFEST))?;
        dir_handle.sync_all()
    })();
    match replaced {
        Err(e) if is_out_of_space(&e) => {
            let _ = fs::remove_file(&tmp);
            overwrite_manifest(&log_dir.join(MANIFEST), &bytes).map_err(|_| e)
        }
        other => other,
    }
}

fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Writes `bytes` over the manifest without growing it (see [`write_manifest`]).
fn overwrite_manifest(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    let old = f.metadata()?.len() as usize;
    if bytes.len() > old {
        return Err(io::Error::from(io::ErrorKind::StorageFull));
    }
    let mut padded = bytes.to_vec();
    padded.resize(old, b' ');
    f.write_all(&padded)?;
    f.sync_data()
}

/// Reads every segment, in order, rebuilding the live set and the GC state; damage goes to
/// `damage`. A torn tail of the newest segment (a damaged end that no valid record follows: an
/// unacknowledged write cut by a crash) is cut off the file, so later starts do not mistake it
/// for damage; damage anywhere else is kept and reported.
fn recover(
    log_dir: &Path,
    damage: &mut DamageLog,
) -> Result<(GcState, Vec<Recovered>, RecoveryReport), StoreError> {
    let mut report = RecoveryReport::default();
    let mut segments: Vec<u64> = fs::read_dir(log_dir)
        .map_err(|e| StoreError::Io(format!("cannot list {}: {e}", log_dir.display())))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let hex = name.strip_suffix(".seg")?;
            u64::from_str_radix(hex, 16).ok()
        })
        .collect();
    segments.sort_unstable();
    report.segments = segments.len();
    let newest = segments.last().copied();
    let manifest = read_manifest(log_dir);
    let mut found = Vec::new();
    match &manifest {
        ManifestState::Listed(listed) => {
            for &s in listed.iter().filter(|s| segments.binary_search(s).is_err()) {
                report.missing_segments.push(s);
                found.push(Damage::new(
                    DamageKind::MissingSegment,
                    Some(s),
                    "listed in log/MANIFEST but not on disk: the messages, states and removals it held are lost",
                ));
            }
        }
        ManifestState::Unreadable(e) => found.push(Damage::new(
            DamageKind::Manifest,
            None,
            format!("log/MANIFEST is unreadable ({e}): a missing segment cannot be noticed at this start; the manifest is rebuilt from the segments on disk"),
        )),
        ManifestState::Absent => {}
    }
    let listed = |s: u64| matches!(&manifest, ManifestState::Listed(l) if l.contains(&s));

    let mut gc = GcState::default();
    let mut live: HashMap<QueueId, Recovered> = HashMap::new();
    let mut with_manifest = false;
    for seg in segments {
        let path = segment_path(log_dir, seg);
        let is_newest = Some(seg) == newest;
        // damaged messages indexed from this segment: (offset, id)
        let mut damaged_here: Vec<(u64, QueueId)> = Vec::new();
        let scan = read_segment(&path, seg, is_newest, |item| {
            match item {
                Item::Record {
                    pos,
                    kind,
                    meta,
                    body,
                } => {
                    report.records += 1;
                    match kind {
                        1 => {
                            let envelope: Envelope =
                                serde_json::from_slice(meta).map_err(|e| e.to_string())?;
                            let body = body.expect("message records carry a body");
                            let id = envelope.id;
                            let damaged = body.unreadable.then(|| {
                                damaged_here.push((pos.1, id));
                                format!(
                                    "{} in {} at offset {}",
                                    DamageKind::BodyChecksum.as_str(),
                                    segment_name(seg),
                                    pos.1
                                )
                            });
                            gc.apply(seg, 1, id);
                            live.insert(
                                id,
                                Recovered {
                                    envelope,
                                    body,
                                    pos,
                                    damaged,
                                },
                            );
                        }
                        2 => {
                            let state: MessageState =
                                serde_json::from_slice(meta).map_err(|e| e.to_string())?;
                            if let Some(r) = live.get_mut(&state.id) {
                                gc.apply(seg, 2, state.id);
                                state.apply_to(&mut r.envelope);
                            }
                        }
                        3 => {
                            let id: QueueId =
                                serde_json::from_slice(meta).map_err(|e| e.to_string())?;
                            if live.remove(&id).is_some() {
                                gc.apply(seg, 3, id);
                            }
                        }
                        other => return Err(format!("unknown record kind {other}")),
                    }
                }
                Item::Salvaged { pos, envelope, why } => {
                    let id = envelope.id;
                    if live.contains_key(&id) {
                        return Ok(());
                    }
                    damaged_here.push((pos.1, id));
                    gc.apply(seg, 1, id);
                    live.insert(
                        id,
                        Recovered {
                            envelope,
                            body: BodyRef {
                                segment: seg,
                                offset: pos.1,
                                len: 0,
                                crc: 0,
                                unreadable: true,
                            },
                            pos,
                            damaged: Some(format!(
                                "{} in {} at offset {}",
                                why.as_str(),
                                segment_name(seg),
                                pos.1
                            )),
                        },
                    );
                }
            }
            Ok(())
        })?;
        with_manifest |= scan.version == Some(2);
        if let Some((kind, why)) = &scan.header {
            if is_newest && scan.len <= SEGMENT_HEADER_LEN && !listed(seg) {
                // created by a start that died before the header was synced: holds nothing
                tracing::warn!(segment = %path.display(), %why, "segment torn at creation; removed");
                report.torn_tails += 1;
                if let Err(e) = fs::remove_file(&path) {
                    tracing::error!(segment = %path.display(), error = %e, "cannot remove a torn segment");
                } else {
                    continue;
                }
            } else {
                found.push(Damage::new(*kind, Some(seg), why.clone()).at(0, SEGMENT_HEADER_LEN));
            }
        }
        gc.sizes.insert(seg, scan.len);
        gc.refs.entry(seg).or_default();
        for region in scan.regions {
            if region.tail && is_newest {
                tracing::warn!(segment = %path.display(), offset = region.offset, len = region.len, why = %region.detail, "torn tail after a crash: unacknowledged records cut off");
                report.torn_tails += 1;
                let cut = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(region.offset).and_then(|_| f.sync_all()));
                match cut {
                    Ok(()) => {
                        gc.sizes.insert(seg, region.offset);
                    }
                    Err(e) => {
                        tracing::error!(segment = %path.display(), error = %e, "cannot cut the torn tail off")
                    }
                }
                continue;
            }
            let mut d = Damage::new(region.kind, Some(seg), region.detail.clone())
                .at(region.offset, region.len);
            d.messages.extend(
                damaged_here
                    .iter()
                    .filter(|(at, _)| (region.offset..region.offset + region.len).contains(at))
                    .map(|(_, id)| *id),
            );
            found.push(d);
        }
    }
    if matches!(manifest, ManifestState::Absent) && with_manifest {
        found.push(Damage::new(
            DamageKind::Manifest,
            None,
            "log/MANIFEST is gone while segments written with it exist: a missing segment cannot be noticed at this start; the manifest is rebuilt from the segments on disk",
        ));
    } else if matches!(manifest, ManifestState::Absent) && report.segments > 0 {
        tracing::info!(dir = %log_dir.display(), "version 1 queue log: writing log/MANIFEST (new segments are version 2)");
    }
    for d in found {
        if damage.add(d.clone()) {
            report.damage.push(d);
        }
    }
    let mut recovered: Vec<Recovered> = live.into_values().collect();
    recovered.sort_by_key(|r| r.pos);
    Ok((gc, recovered, report))
}

/// A damaged stretch of a segment: from a record that failed its checks to the next valid
/// record (or the end of the file).
struct Region {
    offset: u64,
    len: u64,
    kind: DamageKind,
    detail: String,
    /// No valid record follows: in the newest segment, an unacknowledged write cut by a crash.
    tail: bool,
}

/// What [`read_segment`] hands its visitor, in log order.
enum Item<'a> {
    /// A valid record; a message whose body failed its checksum (newest segment) comes with
    /// an unreadable body.
    Record {
        pos: LogPos,
        kind: u8,
        meta: &'a [u8],
        body: Option<BodyRef>,
    },
    /// An envelope read from a damaged region (not from a torn tail of the newest segment).
    Salvaged {
        pos: LogPos,
        envelope: Envelope,
        why: DamageKind,
    },
}

/// What reading a segment found.
struct SegmentScan {
    len: u64,
    /// The header's version, when the header is valid.
    version: Option<u32>,
    /// A damaged segment header.
    header: Option<(DamageKind, String)>,
    regions: Vec<Region>,
}

impl SegmentScan {
    /// The records from `offset` to `end` are damaged, as `fault` says; `tail`: nothing valid
    /// follows them.
    fn damaged(&mut self, offset: u64, end: u64, fault: Fault, tail: bool) {
        self.regions.push(Region {
            offset,
            len: end - offset,
            kind: fault.kind,
            detail: fault.detail,
            tail,
        });
    }
}

/// Why a record at some offset is not valid.
struct Fault {
    kind: DamageKind,
    detail: String,
    /// The record's own end, when its header is intact: then the damage is its body.
    end: Option<u64>,
}

impl Fault {
    fn new(kind: DamageKind, detail: impl Into<String>) -> Self {
        Fault {
            kind,
            detail: detail.into(),
            end: None,
        }
    }
}

/// A record header's fields.
struct Header {
    kind: u8,
    meta_len: usize,
    body_len: u64,
    body_crc: u32,
    head_crc: u32,
}

impl Header {
    fn parse(h: &[u8; RECORD_HEADER_LEN]) -> Result<Header, Fault> {
        if &h[..4] != RECORD_MAGIC {
            return Err(Fault::new(DamageKind::RecordMagic, "bad record magic"));
        }
        Ok(Header {
            kind: h[4],
            meta_len: u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize,
            body_len: u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")),
            body_crc: u32::from_le_bytes(h[20..24].try_into().expect("4 bytes")),
            head_crc: u32::from_le_bytes(h[24..28].try_into().expect("4 bytes")),
        })
    }

    /// The record's length, when it fits in `room` bytes.
    fn record_len(&self, room: u64) -> Result<u64, Fault> {
        let len = RECORD_HEADER_LEN as u64 + self.meta_len as u64 + self.body_len;
        if self.meta_len > MAX_META_LEN || len > room {
            return Err(Fault::new(
                DamageKind::RecordLength,
                "record runs past the end of the segment",
            ));
        }
        Ok(len)
    }

    fn check(&self, h: &[u8; RECORD_HEADER_LEN], meta: &[u8]) -> Result<(), Fault> {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&h[..24]);
        hasher.update(meta);
        if hasher.finalize() != self.head_crc {
            return Err(Fault::new(
                DamageKind::RecordChecksum,
                "record header checksum mismatch (header or envelope damaged)",
            ));
        }
        if !(1..=3).contains(&self.kind) {
            return Err(Fault::new(
                DamageKind::RecordUndecodable,
                format!("unknown record kind {}", self.kind),
            ));
        }
        Ok(())
    }
}

/// The length of the valid record (header checksum, lengths within the file) at `offset`.
fn valid_record_at(file: &File, offset: u64, len: u64) -> Option<u64> {
    if len.saturating_sub(offset) < RECORD_HEADER_LEN as u64 {
        return None;
    }
    let mut h = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut h, offset).ok()?;
    let header = Header::parse(&h).ok()?;
    let rec_len = header.record_len(len - offset).ok()?;
    let mut meta = vec![0u8; header.meta_len];
    file.read_exact_at(&mut meta, offset + RECORD_HEADER_LEN as u64)
        .ok()?;
    header.check(&h, &meta).ok()?;
    Some(rec_len)
}

/// The next valid record after a damaged one at `from`: a record magic whose header checksum
/// holds and whose lengths fit in the file. A damaged record whose own lengths lead straight to
/// a valid record is skipped whole (its body is not searched).
fn resync(file: &File, from: u64, len: u64, own_end: Option<u64>) -> Option<u64> {
    if let Some(end) = own_end
        && end < len
        && valid_record_at(file, end, len).is_some()
    {
        return Some(end);
    }
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + RECORD_MAGIC.len() - 1];
    let mut at = from + 1;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        if file.read_exact_at(&mut buf[..n], at).is_err() {
            return None;
        }
        for i in 0..n.saturating_sub(RECORD_MAGIC.len() - 1) {
            if &buf[i..i + 4] == RECORD_MAGIC && valid_record_at(file, at + i as u64, len).is_some()
            {
                return Some(at + i as u64);
            }
        }
        if n < buf.len() {
            break;
        }
        at += CHUNK as u64;
    }
    None
}

/// Envelopes readable in a damaged region: at its start and at every record magic in it, the
/// meta is parsed as an envelope (as far as it goes: its length field may be the damage).
fn salvage(file: &File, offset: u64, len: u64) -> Vec<(u64, Envelope)> {
    let n = len.min(MAX_SALVAGE_BYTES) as usize;
    let mut buf = vec![0u8; n];
    if file.read_exact_at(&mut buf, offset).is_err() {
        return Vec::new();
    }
    let mut starts = vec![0usize];
    starts.extend((1..n.saturating_sub(3)).filter(|&i| &buf[i..i + 4] == RECORD_MAGIC));
    let mut out: Vec<(u64, Envelope)> = Vec::new();
    for s in starts {
        let meta_at = s + RECORD_HEADER_LEN;
        if meta_at >= n {
            continue;
        }
        let end = (meta_at + MAX_META_LEN).min(n);
        let parsed = serde_json::Deserializer::from_slice(&buf[meta_at..end])
            .into_iter::<Envelope>()
            .next();
        if let Some(Ok(env)) = parsed
            && !out.iter().any(|(_, e)| e.id == env.id)
        {
            out.push((s as u64, env));
        }
    }
    out
}

/// Hands `visit` each valid record of a segment, in order. After a record that fails its
/// checks, reading goes on at the next valid record (see [`resync`]); the stretch in between
/// is a [`Region`], and the envelopes readable in it are visited as [`Item::Salvaged`] (except
/// in a tail of the `newest` segment: a torn, unacknowledged write). In the `newest` segment
/// bodies are checked too: a message whose body fails is visited with an unreadable body (its
/// envelope is intact) and its record is a region.
fn read_segment(
    path: &Path,
    seg: u64,
    newest: bool,
    mut visit: impl FnMut(Item<'_>) -> Result<(), String>,
) -> Result<SegmentScan, StoreError> {
    let open_err = |e: io::Error| StoreError::Io(format!("cannot open {}: {e}", path.display()));
    let file = File::open(path).map_err(open_err)?;
    // positional reads (resync, salvage) beside the sequential reader
    let pf = file.try_clone().map_err(open_err)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut scan = SegmentScan {
        len,
        version: None,
        header: None,
        regions: Vec::new(),
    };
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; 16];
    if len < SEGMENT_HEADER_LEN || r.read_exact(&mut header).is_err() {
        scan.header = Some((DamageKind::SegmentHeader, "short segment header".into()));
        return Ok(scan);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if &header[..8] != SEGMENT_MAGIC || !(1..=SEGMENT_VERSION).contains(&version) {
        scan.header = Some((
            DamageKind::SegmentHeader,
            "not a queue segment header (bad magic or version); its records are read all the same"
                .into(),
        ));
    } else {
        scan.version = Some(version);
    }
    let mut offset = SEGMENT_HEADER_LEN;
    let mut meta = Vec::new();
    let mut body_buf = Vec::new();
    let seek = |r: &mut BufReader<File>, to: u64| {
        r.seek(SeekFrom::Start(to))
            .map(|_| ())
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))
    };
    while offset < len {
        let fault = match next_record(&mut r, offset, len, newest, &mut meta, &mut body_buf) {
            Ok((kind, rec_len, body_len, body_crc)) => {
                let body = (kind == 1).then_some(BodyRef {
                    segment: seg,
                    offset: offset + RECORD_HEADER_LEN as u64 + meta.len() as u64,
                    len: body_len,
                    crc: body_crc,
                    unreadable: false,
                });
                let item = Item::Record {
                    pos: (seg, offset),
                    kind,
                    meta: &meta,
                    body,
                };
                match visit(item) {
                    Ok(()) => {
                        offset += rec_len;
                        continue;
                    }
                    Err(why) => Fault {
                        kind: DamageKind::RecordUndecodable,
                        detail: format!("undecodable record: {why}"),
                        end: Some(offset + rec_len),
                    },
                }
            }
            Err(f) => f,
        };
        match (fault.kind, fault.end) {
            (DamageKind::BodyChecksum, Some(end)) if end == len => {
                // the last record: nothing valid follows it
                scan.damaged(offset, end, fault, true);
                break;
            }
            (DamageKind::BodyChecksum, Some(end)) => {
                // header and envelope intact: the record's extent is known, the message is
                // indexed with a body that is never read
                let body = BodyRef {
                    segment: seg,
                    offset: offset + RECORD_HEADER_LEN as u64 + meta.len() as u64,
                    len: 0,
                    crc: 0,
                    unreadable: true,
                };
                let item = Item::Record {
                    pos: (seg, offset),
                    kind: 1,
                    meta: &meta,
                    body: Some(body),
                };
                if let Err(why) = visit(item) {
                    tracing::error!(segment = %path.display(), offset, %why, "the damaged message's envelope is undecodable");
                }
                scan.damaged(offset, end, fault, false);
                offset = end;
                seek(&mut r, offset)?;
            }
            (DamageKind::RecordUndecodable, Some(end)) => {
                // checksums hold: not a torn write, the record is just not what it says
                scan.damaged(offset, end, fault, false);
                offset = end;
                seek(&mut r, offset)?;
            }
            _ => {
                let next = resync(&pf, offset, len, own_extent(&pf, offset, len));
                let end = next.unwrap_or(len);
                let tail = next.is_none();
                if !(tail && newest) {
                    for (at, envelope) in salvage(&pf, offset, end - offset) {
                        let item = Item::Salvaged {
                            pos: (seg, offset + at),
                            envelope,
                            why: fault.kind,
                        };
                        if let Err(why) = visit(item) {
                            tracing::error!(segment = %path.display(), offset, %why, "cannot index a salvaged envelope");
                        }
                    }
                }
                scan.damaged(offset, end, fault, tail);
                if tail {
                    break;
                }
                offset = end;
                seek(&mut r, offset)?;
            }
        }
    }
    Ok(scan)
}

/// Where a damaged record would end by its own (unchecked) lengths, when they fit in the file.
fn own_extent(file: &File, offset: u64, len: u64) -> Option<u64> {
    let mut h = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut h, offset).ok()?;
    let header = Header::parse(&h).ok()?;
    header.record_len(len - offset).ok().map(|l| offset + l)
}

/// Reads the record at `offset` (the reader is there): `(kind, record length, body length,
/// body crc)`, the meta left in `meta`.
fn next_record(
    r: &mut BufReader<File>,
    offset: u64,
    len: u64,
    verify_bodies: bool,
    meta: &mut Vec<u8>,
    body_buf: &mut Vec<u8>,
) -> Result<(u8, u64, u64, u32), Fault> {
    let mut h = [0u8; RECORD_HEADER_LEN];
    if len - offset < RECORD_HEADER_LEN as u64 || r.read_exact(&mut h).is_err() {
        return Err(Fault::new(
            DamageKind::RecordLength,
            "truncated record header",
        ));
    }
    let header = Header::parse(&h)?;
    let rec_len = header.record_len(len - offset)?;
    meta.resize(header.meta_len, 0);
    if r.read_exact(meta).is_err() {
        return Err(Fault::new(DamageKind::RecordLength, "truncated meta"));
    }
    header.check(&h, meta)?;
    if verify_bodies && header.body_len > 0 {
        body_buf.resize(header.body_len as usize, 0);
        if r.read_exact(body_buf).is_err() {
            return Err(Fault::new(DamageKind::RecordLength, "truncated body"));
        }
        if crc32fast::hash(body_buf) != header.body_crc {
            return Err(Fault {
                kind: DamageKind::BodyChecksum,
                detail: "body checksum mismatch".into(),
                end: Some(offset + rec_len),
            });
        }
    } else if header.body_len > 0 {
        r.seek_relative(header.body_len as i64)
            .map_err(|e| Fault::new(DamageKind::RecordLength, e.to_string()))?;
    }
    Ok((header.kind, rec_len, header.body_len, header.body_crc))
}

/// The single writer: owns the active segment and the GC state.
struct Committer {
    dir: PathBuf,
    dir_handle: File,
    segment_size: u64,
    active: u64,
    file: File,
    len: u64,
    gc: GcState,
    disk_bytes: Arc<AtomicU64>,
    damage: Arc<Mutex<DamageLog>>,
}

impl Committer {
    fn start(
        dir: PathBuf,
        segment_size: u64,
        gc: GcState,
        disk_bytes: Arc<AtomicU64>,
        damage: Arc<Mutex<DamageLog>>,
    ) -> Result<Self, StoreError> {
        let dir_handle = File::open(&dir)
            .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", dir.display())))?;
        let next = gc.sizes.keys().next_back().map_or(1, |n| n + 1);
        let (file, len) = create_segment(&dir, &dir_handle, next, gc.sizes.keys().copied())?;
        let mut c = Committer {
            dir,
            dir_handle,
            segment_size,
            active: next,
            file,
            len,
            gc,
            disk_bytes,
            damage,
        };
        c.gc.sizes.insert(next, len);
        c.gc.refs.entry(next).or_default();
        c.collect_garbage();
        Ok(c)
    }

    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut batch: Vec<Op> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            let mut bytes = batch[0].record.len();
            while bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.record.len();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch, &mut buf);
            self.collect_garbage();
            self.maybe_rotate();
        }
        // channel closed: everything sent was committed above
        let _ = self.file.sync_data();
    }

    /// Writes a batch with one write and one fdatasync, then answers every op in it.
    fn commit(&mut self, batch: &mut Vec<Op>, buf: &mut Vec<u8>) {
        buf.clear();
        let start = self.len;
        let mut placed = Vec::with_capacity(batch.len());
        // one record (a large message, typically) is written as it is: no copy of its body
        let data: &[u8] = if let [only] = batch.as_slice() {
            placed.push(start);
            &only.record
        } else {
            for op in batch.iter() {
                let at = start + buf.len() as u64;
                placed.push(at);
                buf.extend_from_slice(&op.record);
            }
            buf
        };
        let written = data.len() as u64;
        let result = self
            .file
            .write_all(data)
            .and_then(|_| self.file.sync_data());
        // a batch of large messages grew the buffer: give that memory back
        if buf.capacity() > RETAINED_BATCH_BUFFER {
            *buf = Vec::with_capacity(RETAINED_BATCH_BUFFER);
        }
        match result {
            Ok(()) => {
                self.len += written;
                self.gc.sizes.insert(self.active, self.len);
                for (op, at) in batch.drain(..).zip(placed) {
                    self.gc.apply(self.active, op.kind, op.id);
                    let body = op.body_at.map(|(off, len, crc)| BodyRef {
                        segment: self.active,
                        offset: at + off as u64,
                        len,
                        crc,
                        unreadable: false,
                    });
                    if let Some(done) = op.done {
                        let _ = done.send(Ok(Appended {
                            pos: (self.active, at),
                            body,
                        }));
                    }
                }
            }
            Err(e) => {
                let err = StoreError::from_io(&e);
                tracing::error!(segment = self.active, error = %e, records = batch.len(), "queue write failed; batch refused");
                // cut the segment back to its last good length so it stays readable
                if let Err(te) = self
                    .file
                    .set_len(start)
                    .and_then(|_| self.file.seek(SeekFrom::Start(start)).map(|_| ()))
                {
                    tracing::error!(error = %te, "cannot truncate segment after failed write; starting a new one");
                    self.rotate();
                }
                for op in batch.drain(..) {
                    if let Some(done) = op.done {
                        let _ = done.send(Err(match &err {
                            StoreError::Full(m) => StoreError::Full(m.clone()),
                            other => StoreError::Io(other.to_string()),
                        }));
                    }
                }
            }
        }
        self.publish_size();
    }

    fn publish_size(&self) {
        self.disk_bytes
            .store(self.gc.sizes.values().sum(), Ordering::Relaxed);
    }

    fn maybe_rotate(&mut self) {
        let dead = self.gc.refs.get(&self.active).copied().unwrap_or(0) == 0;
        if self.len >= self.segment_size || (dead && self.len >= ROTATE_DEAD_ACTIVE_AT) {
            self.rotate();
            self.collect_garbage();
        }
    }

    fn rotate(&mut self) {
        let next = self.active + 1;
        match create_segment(
            &self.dir,
            &self.dir_handle,
            next,
            self.gc.sizes.keys().copied(),
        ) {
            Ok((file, len)) => {
                self.file = file;
                self.len = len;
                self.active = next;
                self.gc.sizes.insert(next, len);
                self.gc.refs.entry(next).or_default();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a new segment; appending to the current one")
            }
        }
    }

    /// Deletes segments nothing needs; durable before their dependents are released.
    /// The manifest is rewritten without them first: a crash in between leaves a segment that
    /// is not listed (read, then deleted again), never a listed one that is gone.
    fn collect_garbage(&mut self) {
        loop {
            let pinned = self
                .damage
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pinned();
            let dead = self.gc.deletable(self.active, &pinned);
            if dead.is_empty() {
                break;
            }
            let keep = self.gc.sizes.keys().copied().filter(|s| !dead.contains(s));
            if let Err(e) = write_manifest(&self.dir, &self.dir_handle, keep) {
                tracing::error!(error = %e, "cannot write log/MANIFEST; finished segments are kept for now");
                break;
            }
            let mut removed = Vec::new();
            for seg in dead {
                let path = segment_path(&self.dir, seg);
                match fs::remove_file(&path) {
                    Ok(()) => removed.push(seg),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => removed.push(seg),
                    Err(e) => {
                        tracing::error!(segment = %path.display(), error = %e, "cannot delete segment");
                        // keep it referenced so we do not retry in a loop
                        self.gc.incr(seg);
                    }
                }
            }
            if let Err(e) = self.dir_handle.sync_all() {
                tracing::error!(error = %e, "cannot sync queue directory after deleting segments");
                break;
            }
            tracing::debug!(segments = ?removed, "deleted finished segments");
            self.gc.forget(&removed);
            let mut damage = self.damage.lock().unwrap_or_else(|e| e.into_inner());
            if damage.forget_acknowledged_of(&removed) {
                damage.save_or_log();
            }
        }
        self.publish_size();
    }
}

/// Creates segment `n` and lists it in the manifest with the `live` ones; durable (file and
/// directory synced) when this returns.
fn create_segment(
    dir: &Path,
    dir_handle: &File,
    n: u64,
    live: impl Iterator<Item = u64>,
) -> Result<(File, u64), StoreError> {
    let path = segment_path(dir, n);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::from_io(&e))?;
    let live: Vec<u64> = live.collect();
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    file.write_all(&header)
        .and_then(|_| file.sync_all())
        .and_then(|_| {
            write_manifest(
                dir,
                dir_handle,
                live.iter().copied().chain(std::iter::once(n)),
            )
        })
        .map_err(|e| {
            let _ = fs::remove_file(&path);
            // the manifest may list `n` already (its rename done, the directory sync failed):
            // list the live segments alone again, so `n` is not taken for a lost segment
            let _ = write_manifest(dir, dir_handle, live.iter().copied());
            StoreError::from_io(&e)
        })?;
    Ok((file, SEGMENT_HEADER_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_space_errors_are_full_and_others_are_io() {
        // ENOSPC, EDQUOT, EFBIG: the queue is full (452); EIO, EACCES: a write failure
        for errno in [28, 122, 27] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(
                matches!(StoreError::from_io(&e), StoreError::Full(_)),
                "{e}"
            );
        }
        assert!(is_out_of_space(&io::Error::from_raw_os_error(28)));
        assert!(!is_out_of_space(&io::Error::from_raw_os_error(27)));
        for errno in [5, 13] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(matches!(StoreError::from_io(&e), StoreError::Io(_)), "{e}");
        }
    }
    use crate::queue::message::RcptStatus;

    fn envelope(id: u64) -> Envelope {
        Envelope {
            size: 5,
            ..Envelope::for_test(id, "a@sender.test", &["b@example.test"])
        }
    }

    /// The record of a new message `id` with `body`.
    fn message(id: u64, body: impl Into<Vec<u8>>) -> Record {
        Record::Message {
            envelope: envelope(id),
            body: body.into(),
        }
    }

    /// A crash in the middle of writing message `id`: all but the last bytes of its record
    /// are appended to `segment`.
    fn write_torn_record(segment: &Path, id: u64) {
        let (partial, _) = message(id, vec![b'y'; 100]).encode();
        let mut f = OpenOptions::new().append(true).open(segment).unwrap();
        f.write_all(&partial[..partial.len() - 10]).unwrap();
    }

    /// The one damage `store` lists; fails the test if it lists none or more.
    fn only_damage(store: &Store) -> Damage {
        let listed = store.damage().active();
        assert_eq!(listed.len(), 1, "{listed:?}");
        listed.into_iter().next().unwrap()
    }

    /// `Store::open` in a test that reopens a directory: the dropped store's committer thread
    /// releases the directory lock when it has finished its last write, so wait for that.
    fn open_store(
        dir: &Path,
        segment_size: u64,
    ) -> Result<(Store, Vec<Recovered>, RecoveryReport), StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let lock = loop {
            match super::super::lock::DirLock::exclusive(dir) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::yield_now(),
            }
        };
        Store::open(dir, segment_size, lock)
    }

    fn seg_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.join("log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn appended_messages_survive_reopen_with_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, rec, _) = open_store(dir.path(), 1 << 20).unwrap();
            assert!(rec.is_empty());
            for i in 1..=3 {
                store.append(message(i, format!("body{i}"))).await.unwrap();
            }
            let mut st = MessageState::of(&envelope(2));
            st.held = true;
            store.append(Record::State(st)).await.unwrap();
            store.append(Record::Remove(QueueId(1))).await.unwrap();
        }
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.torn_tails, 0);
        let ids: Vec<u64> = rec.iter().map(|r| r.envelope.id.0).collect();
        assert_eq!(ids, vec![2, 3], "arrival order kept, removed message gone");
        assert!(rec[0].envelope.held, "state record applied");
        assert_eq!(store.read_body(QueueId(3), rec[1].body).unwrap(), b"body3");
    }

    #[tokio::test]
    async fn torn_tail_is_ignored_and_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _, _) = open_store(dir.path(), 1 << 20).unwrap();
            for i in 1..=2 {
                store.append(message(i, vec![b'x'; 100])).await.unwrap();
            }
        }
        // simulate a crash in the middle of the next write
        let last = dir
            .path()
            .join("log")
            .join(seg_files(dir.path()).pop().unwrap());
        write_torn_record(&last, 3);
        let (_, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.torn_tails, 1);
        assert_eq!(rec.len(), 2);
    }

    #[tokio::test]
    async fn damaged_body_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = open_store(dir.path(), 1 << 20).unwrap();
        let a = store.append(message(1, b"hello world")).await.unwrap();
        let body = a.body.unwrap();
        let path = segment_path(&dir.path().join("log"), body.segment);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"J", body.offset).unwrap();
        let err = store.read_body(QueueId(1), body).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(..)), "{err}");
    }

    #[tokio::test]
    async fn finished_segments_are_deleted_and_removes_outlive_bodies() {
        let dir = tempfile::tempdir().unwrap();
        // tiny segments: every message rotates
        let (store, _, _) = open_store(dir.path(), 64).unwrap();
        for i in 1..=3 {
            store.append(message(i, vec![b'z'; 200])).await.unwrap();
        }
        // message 1 delivered: its remove record lands in a later segment
        store.append(Record::Remove(QueueId(1))).await.unwrap();
        store.sync().await.unwrap();
        drop(store);
        let (store, rec, _) = open_store(dir.path(), 64).unwrap();
        let ids: Vec<u64> = rec.iter().map(|r| r.envelope.id.0).collect();
        assert_eq!(ids, vec![2, 3], "message 1 must not come back");
        store.append(Record::Remove(QueueId(2))).await.unwrap();
        store.append(Record::Remove(QueueId(3))).await.unwrap();
        store.sync().await.unwrap();
        drop(store);
        let (_, rec, _) = open_store(dir.path(), 64).unwrap();
        assert!(rec.is_empty());
        // only the newest (active) segments remain
        assert!(
            seg_files(dir.path()).len() <= 2,
            "{:?}",
            seg_files(dir.path())
        );
    }

    #[tokio::test]
    async fn segment_whose_messages_all_ended_inside_it_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = open_store(dir.path(), 64 * 1024).unwrap();
        // ~1.5 MiB of messages, each delivered (removed) right away, in the same segments
        for i in 1..=400 {
            store.append(message(i, vec![b'm'; 4000])).await.unwrap();
            store.append(Record::Remove(QueueId(i))).await.unwrap();
        }
        store.sync().await.unwrap();
        let files = seg_files(dir.path());
        assert!(files.len() <= 2, "finished segments must go: {files:?}");
        assert!(
            store.disk_bytes() < 200 * 1024,
            "{} bytes left on disk",
            store.disk_bytes()
        );
    }

    #[tokio::test]
    async fn state_update_in_later_segment_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = open_store(dir.path(), 64).unwrap();
        store.append(message(1, vec![1; 100])).await.unwrap();
        store.append(message(2, vec![2; 100])).await.unwrap();
        let mut st = MessageState::of(&envelope(1));
        st.recipients[0].status = RcptStatus::Pending;
        st.recipients[0].attempts = 7;
        store.append(Record::State(st)).await.unwrap();
        store.append(Record::Remove(QueueId(2))).await.unwrap();
        store.sync().await.unwrap();
        drop(store);
        let (_, rec, _) = open_store(dir.path(), 64).unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.recipients[0].attempts, 7);
    }

    /// Messages 1..=5 in segment 1, 6..=10 in segment 2 (each start opens a new segment);
    /// returns the log directory.
    async fn two_segments(dir: &Path) -> PathBuf {
        for range in [1..=5u64, 6..=10] {
            let (store, _, _) = open_store(dir, 1 << 20).unwrap();
            for i in range {
                let body = format!("body of message {i}").repeat(20);
                store.append(message(i, body)).await.unwrap();
            }
        }
        dir.join("log")
    }

    /// The record of message `id` in segment `seg`.
    fn record_of(log: &Path, seg: u64, id: u64) -> RecordInfo {
        records(&segment_path(log, seg))
            .unwrap()
            .into_iter()
            .find(|r| r.kind == 1 && r.id == Some(QueueId(id)))
            .unwrap_or_else(|| panic!("no record of {id} in segment {seg}"))
    }

    fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
        f.sync_all().unwrap();
    }

    /// Which part of a record a test damages.
    #[derive(Debug, Clone, Copy)]
    enum Part {
        /// `meta_len`: the record's extent is lost, reading resynchronises by scanning.
        HeaderLength,
        /// One character of the envelope JSON: still parseable, checksum fails.
        EnvelopeByte,
        /// The start of the envelope JSON: unparseable.
        EnvelopeGarbled,
        Body,
    }

    fn damage(log: &Path, seg: u64, id: u64, part: Part) {
        let r = record_of(log, seg, id);
        let path = segment_path(log, seg);
        match part {
            Part::HeaderLength => overwrite(&path, r.offset + 8, &[0xff; 4]),
            // the sender's first letter: `{"id":N,"kind":"mail","arrival":N,"sender":"a@...`
            Part::EnvelopeByte => {
                let mut meta = vec![0u8; r.meta_len as usize];
                File::open(&path)
                    .unwrap()
                    .read_exact_at(&mut meta, r.offset + 32)
                    .unwrap();
                let at = meta
                    .windows(10)
                    .position(|w| w == b"\"sender\":\"")
                    .unwrap()
                    + 10;
                overwrite(&path, r.offset + 32 + at as u64, b"z");
            }
            Part::EnvelopeGarbled => overwrite(&path, r.offset + 32, b"\0\0\0\0\0\0"),
            Part::Body => overwrite(&path, r.offset + 32 + r.meta_len + 5, b"#"),
        }
    }

    fn ids(rec: &[Recovered]) -> Vec<u64> {
        rec.iter().map(|r| r.envelope.id.0).collect()
    }

    /// Damage to one record of an older segment or of the newest one, in its middle: every
    /// other message is recovered intact; the damaged one comes back with an unreadable body
    /// when its envelope can be read, and the damage is listed with its place.
    async fn one_damaged_record(seg: u64, id: u64, part: Part) {
        let dir = tempfile::tempdir().unwrap();
        let log = two_segments(dir.path()).await;
        let before = record_of(&log, seg, id);
        damage(&log, seg, id, part);
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        let all: Vec<u64> = (1..=10).collect();
        let envelope_lost = matches!(part, Part::EnvelopeGarbled);
        let body_checked_later = matches!(part, Part::Body) && seg == 1;
        let want: Vec<u64> = if envelope_lost {
            all.iter().copied().filter(|i| *i != id).collect()
        } else {
            all.clone()
        };
        assert_eq!(
            ids(&rec),
            want,
            "{part:?} in segment {seg}: every intact message kept"
        );
        assert_eq!(
            report.torn_tails, 0,
            "{part:?} in segment {seg}: not a tail"
        );
        for r in &rec {
            let i = r.envelope.id.0;
            if i == id && !body_checked_later {
                assert!(r.body.unreadable && r.damaged.is_some(), "{part:?}: {r:?}");
                let err = store.read_body(r.envelope.id, r.body).unwrap_err();
                assert!(matches!(err, StoreError::Corrupt(..)), "{err}");
            } else if i != id {
                assert!(!r.body.unreadable && r.damaged.is_none(), "{r:?}");
                assert_eq!(
                    store.read_body(r.envelope.id, r.body).unwrap(),
                    format!("body of message {i}").repeat(20).into_bytes()
                );
            }
        }
        if body_checked_later {
            // an older segment's bodies are checked when read for delivery
            assert!(report.damage.is_empty(), "{:?}", report.damage);
            let r = rec.iter().find(|r| r.envelope.id.0 == id).unwrap();
            let err = store.read_body(r.envelope.id, r.body).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(..)), "{err}");
        }
        let d = &only_damage(&store);
        assert_eq!(d.segment_number(), Some(seg));
        let offset = if body_checked_later {
            // found when read: the body's offset
            before.offset + 32 + before.meta_len
        } else {
            before.offset
        };
        assert_eq!(d.offset, Some(offset), "{d:?}");
        let expect = match part {
            Part::HeaderLength => DamageKind::RecordLength,
            Part::EnvelopeByte | Part::EnvelopeGarbled => DamageKind::RecordChecksum,
            Part::Body => DamageKind::BodyChecksum,
        };
        assert_eq!(d.what, expect, "{d:?}");
        if envelope_lost {
            assert!(d.messages.is_empty(), "{d:?}");
        } else {
            assert_eq!(d.messages, vec![QueueId(id)], "{d:?}");
        }
        if matches!(part, Part::EnvelopeByte) {
            let r = rec.iter().find(|r| r.envelope.id.0 == id).unwrap();
            assert_eq!(r.envelope.sender, "z@sender.test", "read as damaged");
        }
        assert!(store.damage().pinned().contains(&seg));
    }

    /// One test per [`Part`], each damaging message `id` in segment `seg` through
    /// [`one_damaged_record`].
    macro_rules! one_damaged_record_tests {
        ($seg:literal, $id:literal: $($name:ident => $part:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $name() {
                one_damaged_record($seg, $id, Part::$part).await;
            }
        )*};
    }

    one_damaged_record_tests!(1, 3:
        damaged_header_in_older_segment => HeaderLength,
        damaged_envelope_in_older_segment => EnvelopeByte,
        garbled_envelope_in_older_segment => EnvelopeGarbled,
        damaged_body_in_older_segment => Body,
    );

    one_damaged_record_tests!(2, 8:
        damaged_header_in_the_middle_of_the_newest_segment => HeaderLength,
        damaged_envelope_in_the_middle_of_the_newest_segment => EnvelopeByte,
        garbled_envelope_in_the_middle_of_the_newest_segment => EnvelopeGarbled,
        damaged_body_in_the_middle_of_the_newest_segment => Body,
    );

    #[tokio::test]
    async fn damaged_last_record_of_an_older_segment_is_damage_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_segments(dir.path()).await;
        damage(&log, 1, 5, Part::HeaderLength);
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.torn_tails, 0);
        assert_eq!(ids(&rec), (1..=10).collect::<Vec<_>>());
        assert!(rec[4].body.unreadable);
        assert_eq!(only_damage(&store).messages, vec![QueueId(5)]);
    }

    #[tokio::test]
    async fn damaged_segment_is_kept_until_repaired_and_damage_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_segments(dir.path()).await;
        damage(&log, 1, 3, Part::EnvelopeByte);
        {
            let (store, rec, _) = open_store(dir.path(), 1 << 20).unwrap();
            // everything leaves the queue (delivered, or bounced for 3)
            for r in &rec {
                store.append(Record::Remove(r.envelope.id)).await.unwrap();
            }
            store.sync().await.unwrap();
            assert!(
                seg_files(dir.path()).contains(&segment_name(1)),
                "a damaged segment is never collected: {:?}",
                seg_files(dir.path())
            );
        }
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert!(rec.is_empty(), "{:?}", ids(&rec));
        assert!(report.damage.is_empty(), "known damage is not new");
        assert_eq!(store.damage().active().len(), 1, "still reported");
        assert!(seg_files(dir.path()).contains(&segment_name(1)));
        assert_eq!(store.damage().acknowledge(None).len(), 1);
        store.damage().save().unwrap();
        // the next batch runs the GC after it is answered: a second one waits for that GC
        store.sync().await.unwrap();
        store.sync().await.unwrap();
        assert!(
            !seg_files(dir.path()).contains(&segment_name(1)),
            "repaired and dead: collected {:?}",
            seg_files(dir.path())
        );
        drop(store);
        let (store, _, _) = open_store(dir.path(), 1 << 20).unwrap();
        assert!(store.damage().active().is_empty());
    }

    #[tokio::test]
    async fn missing_segment_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_segments(dir.path()).await;
        fs::remove_file(segment_path(&log, 1)).unwrap();
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&rec), (6..=10).collect::<Vec<_>>());
        assert_eq!(report.missing_segments, vec![1]);
        let d = only_damage(&store);
        assert_eq!(d.what, DamageKind::MissingSegment);
        assert_eq!(d.segment.as_deref(), Some("0000000000000001.seg"));
        drop(store);
        // the new manifest no longer lists it; the saved damage list still does
        let (store, _, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert!(report.missing_segments.is_empty());
        assert_eq!(store.damage().active().len(), 1);
    }

    #[tokio::test]
    async fn collected_segments_are_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _, _) = open_store(dir.path(), 64).unwrap();
            for i in 1..=6 {
                store.append(message(i, vec![b'g'; 100])).await.unwrap();
                if i % 2 == 0 {
                    store.append(Record::Remove(QueueId(i - 1))).await.unwrap();
                }
            }
            store.sync().await.unwrap();
        }
        let (store, rec, report) = open_store(dir.path(), 64).unwrap();
        assert_eq!(ids(&rec), vec![2, 4, 6]);
        assert!(report.missing_segments.is_empty());
        assert!(
            store.damage().active().is_empty(),
            "{:?}",
            store.damage().active()
        );
    }

    #[tokio::test]
    async fn deleted_manifest_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_segments(dir.path()).await;
        fs::remove_file(log.join(MANIFEST)).unwrap();
        let (store, rec, _) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.len(), 10);
        assert_eq!(only_damage(&store).what, DamageKind::Manifest);
    }

    #[test]
    fn a_manifest_overwritten_in_place_on_a_full_disk_reads_back_shorter() {
        let dir = tempfile::tempdir().unwrap();
        let handle = File::open(dir.path()).unwrap();
        write_manifest(dir.path(), &handle, [1, 2, 3].into_iter()).unwrap();
        let path = dir.path().join(MANIFEST);
        let old = fs::metadata(&path).unwrap().len();
        let shorter = serde_json::to_vec(&Manifest {
            version: 1,
            segments: vec![segment_name(3)],
        })
        .unwrap();
        overwrite_manifest(&path, &shorter).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), old, "no new block");
        match read_manifest(dir.path()) {
            ManifestState::Listed(set) => assert_eq!(set.into_iter().collect::<Vec<_>>(), [3]),
            _ => panic!("padded manifest unreadable"),
        }
        // a longer list cannot be written without growing the file
        let longer = serde_json::to_vec(&Manifest {
            version: 1,
            segments: (1..=9).map(segment_name).collect(),
        })
        .unwrap();
        assert!(overwrite_manifest(&path, &longer).is_err());
    }

    #[tokio::test]
    async fn version_1_segments_are_read_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        fs::create_dir_all(&log).unwrap();
        // a segment as version 1 wrote it: its header, then records; no manifest
        let mut seg = Vec::new();
        seg.extend_from_slice(SEGMENT_MAGIC);
        seg.extend_from_slice(&1u32.to_le_bytes());
        seg.extend_from_slice(&[0; 4]);
        for i in 1..=3 {
            seg.extend_from_slice(&message(i, b"old").encode().0);
        }
        fs::write(segment_path(&log, 7), &seg).unwrap();
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&rec), vec![1, 2, 3]);
        assert!(report.damage.is_empty(), "{:?}", report.damage);
        assert_eq!(store.read_body(QueueId(2), rec[1].body).unwrap(), b"old");
        assert!(log.join(MANIFEST).exists(), "manifest written");
        drop(store);
        let (store, rec, _) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.len(), 3);
        assert!(store.damage().active().is_empty());
    }

    #[tokio::test]
    async fn torn_tail_is_cut_off_and_not_damage_at_later_starts() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_segments(dir.path()).await;
        let newest = segment_path(&log, 2);
        let len = fs::metadata(&newest).unwrap().len();
        write_torn_record(&newest, 11);
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.torn_tails, 1);
        assert_eq!(rec.len(), 10);
        assert!(store.damage().active().is_empty());
        assert_eq!(fs::metadata(&newest).unwrap().len(), len, "cut back");
        drop(store);
        // segment 2 is an older one now: no damage there
        let (store, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!((rec.len(), report.torn_tails), (10, 0));
        assert!(store.damage().active().is_empty());
    }
}
