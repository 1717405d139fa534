//! The queue's durable storage: an append-only log of records in segment files, written by one
//! committer thread with group commit.
//!
//! # Format
//! `DIR/log/<16 hex digits>.seg`, numbered in write order. A segment starts with a 16-byte
//! header (`MXPODSEG`, version) followed by records:
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
//! # Guarantees
//! - [`Store::append`] resolves only after the record and everything before it are on disk
//!   (`fdatasync`, and the directory fsync'd after a new segment is created). Concurrent
//!   appends share one write and one `fdatasync`: throughput follows disk bandwidth, not fsync
//!   latency.
//! - A crash can leave a torn record only at the end of the newest segment: records after the
//!   last `fdatasync` were never acknowledged. Recovery stops reading a segment at the first
//!   record that fails its checks, and never appends to an old segment: each start opens a new
//!   one. A body is checked against its CRC when read for delivery, so a damaged message is
//!   never delivered in part.
//! - A segment file is deleted only when nothing in it is needed: no live message's body or
//!   latest state, and no remove record whose message body still exists in an older segment
//!   (otherwise the message would come back after a restart). Deletions are made durable
//!   (directory fsync) before the records that depended on them are released.
//!
//! # Errors
//! A failed write or sync (a full disk, say) fails every append of that batch; the segment is
//! cut back to its last good length so it stays readable, and the committer goes on serving.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{mpsc, oneshot};

use super::message::{Envelope, MessageState, QueueId};

const SEGMENT_MAGIC: &[u8; 8] = b"MXPODSEG";
const SEGMENT_VERSION: u32 = 1;
const SEGMENT_HEADER_LEN: u64 = 16;
const RECORD_MAGIC: &[u8; 4] = b"MXR1";
const RECORD_HEADER_LEN: usize = 32;
/// Op kind that writes nothing: answered once everything before it is durable.
const BARRIER: u8 = 0;
const MAX_META_LEN: usize = 16 << 20;
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
        // ENOSPC, EDQUOT, EFBIG
        match e.raw_os_error() {
            Some(28) | Some(122) | Some(27) => StoreError::Full(e.to_string()),
            _ => StoreError::Io(e.to_string()),
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
}

/// What recovery found and did, for the start-up log line.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: usize,
    pub torn_tails: usize,
    pub corrupt_segments: Vec<String>,
    pub deleted_segments: usize,
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
        let (state, recovered, report) = recover(&log_dir)?;
        let disk_bytes = Arc::new(AtomicU64::new(0));
        let mut committer =
            Committer::start(log_dir.clone(), segment_size, state, disk_bytes.clone())?;
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
    pub fn read_body(&self, id: QueueId, body: BodyRef) -> Result<Vec<u8>, StoreError> {
        let path = segment_path(&self.log_dir, body.segment);
        let file = File::open(&path)
            .map_err(|e| StoreError::Corrupt(id, format!("cannot open {}: {e}", path.display())))?;
        let mut buf = vec![0u8; body.len as usize];
        file.read_exact_at(&mut buf, body.offset)
            .map_err(|e| StoreError::Corrupt(id, format!("cannot read body: {e}")))?;
        if crc32fast::hash(&buf) != body.crc {
            return Err(StoreError::Corrupt(id, "body checksum mismatch".into()));
        }
        Ok(buf)
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
    dir.join(format!("{n:016x}.seg"))
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

    /// Segments other than `active` that nothing keeps.
    fn deletable(&self, active: u64) -> Vec<u64> {
        self.sizes
            .keys()
            .copied()
            .filter(|s| *s != active && self.refs.get(s).copied().unwrap_or(0) == 0)
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

/// Reads every segment, in order, rebuilding the live set and the GC state.
fn recover(log_dir: &Path) -> Result<(GcState, Vec<Recovered>, RecoveryReport), StoreError> {
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

    let mut gc = GcState::default();
    let mut live: HashMap<QueueId, Recovered> = HashMap::new();
    for seg in segments {
        let path = segment_path(log_dir, seg);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        gc.sizes.insert(seg, size);
        gc.refs.entry(seg).or_default();
        let verify_bodies = Some(seg) == newest;
        let outcome = read_segment(&path, seg, verify_bodies, |pos, kind, meta, body| {
            report.records += 1;
            match kind {
                1 => {
                    let envelope: Envelope =
                        serde_json::from_slice(meta).map_err(|e| e.to_string())?;
                    let body = body.expect("message records carry a body");
                    gc.apply(seg, 1, envelope.id);
                    live.insert(
                        envelope.id,
                        Recovered {
                            envelope,
                            body,
                            pos,
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
                    let id: QueueId = serde_json::from_slice(meta).map_err(|e| e.to_string())?;
                    if live.remove(&id).is_some() {
                        gc.apply(seg, 3, id);
                    }
                }
                other => return Err(format!("unknown record kind {other}")),
            }
            Ok(())
        })?;
        match outcome {
            SegmentEnd::Clean => {}
            SegmentEnd::Damaged { offset, why } if Some(seg) == newest => {
                tracing::warn!(segment = %path.display(), offset, %why, "torn tail after a crash; unacknowledged records ignored");
                report.torn_tails += 1;
            }
            SegmentEnd::Damaged { offset, why } => {
                tracing::error!(segment = %path.display(), offset, %why, "corrupt record in a sealed segment; later records of this segment are skipped");
                report
                    .corrupt_segments
                    .push(format!("{}: {why} at {offset}", path.display()));
                // keep the file for inspection even when nothing in it is live
                gc.incr(seg);
            }
        }
    }
    let mut recovered: Vec<Recovered> = live.into_values().collect();
    recovered.sort_by_key(|r| r.pos);
    Ok((gc, recovered, report))
}

enum SegmentEnd {
    Clean,
    Damaged { offset: u64, why: String },
}

/// Calls `visit(pos, kind, meta, body)` for each valid record of a segment.
fn read_segment(
    path: &Path,
    seg: u64,
    verify_bodies: bool,
    mut visit: impl FnMut(LogPos, u8, &[u8], Option<BodyRef>) -> Result<(), String>,
) -> Result<SegmentEnd, StoreError> {
    let file = File::open(path)
        .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; 16];
    if len < SEGMENT_HEADER_LEN || r.read_exact(&mut header).is_err() {
        return Ok(SegmentEnd::Damaged {
            offset: 0,
            why: "short segment header".into(),
        });
    }
    if &header[..8] != SEGMENT_MAGIC
        || u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) != SEGMENT_VERSION
    {
        return Ok(SegmentEnd::Damaged {
            offset: 0,
            why: "not a queue segment (bad magic or version)".into(),
        });
    }
    let mut offset = SEGMENT_HEADER_LEN;
    let mut meta = Vec::new();
    let mut body_buf = Vec::new();
    while offset < len {
        let damaged = |why: &str| {
            Ok(SegmentEnd::Damaged {
                offset,
                why: why.to_owned(),
            })
        };
        let mut h = [0u8; RECORD_HEADER_LEN];
        if len - offset < RECORD_HEADER_LEN as u64 || r.read_exact(&mut h).is_err() {
            return damaged("truncated record header");
        }
        if &h[..4] != RECORD_MAGIC {
            return damaged("bad record magic");
        }
        let kind = h[4];
        let meta_len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
        let body_len = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
        let body_crc = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes"));
        let head_crc = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
        let rec_len = RECORD_HEADER_LEN as u64 + meta_len as u64 + body_len;
        if meta_len > MAX_META_LEN || rec_len > len - offset {
            return damaged("record runs past the end of the segment");
        }
        meta.resize(meta_len, 0);
        if r.read_exact(&mut meta).is_err() {
            return damaged("truncated meta");
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&h[..24]);
        hasher.update(&meta);
        if hasher.finalize() != head_crc {
            return damaged("record header checksum mismatch");
        }
        let body_offset = offset + RECORD_HEADER_LEN as u64 + meta_len as u64;
        if verify_bodies && body_len > 0 {
            body_buf.resize(body_len as usize, 0);
            if r.read_exact(&mut body_buf).is_err() {
                return damaged("truncated body");
            }
            if crc32fast::hash(&body_buf) != body_crc {
                return damaged("body checksum mismatch");
            }
        } else if body_len > 0 {
            r.seek_relative(body_len as i64)
                .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        }
        let body = (kind == 1).then_some(BodyRef {
            segment: seg,
            offset: body_offset,
            len: body_len,
            crc: body_crc,
        });
        if let Err(why) = visit((seg, offset), kind, &meta, body) {
            return damaged(&format!("undecodable record: {why}"));
        }
        offset += rec_len;
    }
    Ok(SegmentEnd::Clean)
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
}

impl Committer {
    fn start(
        dir: PathBuf,
        segment_size: u64,
        gc: GcState,
        disk_bytes: Arc<AtomicU64>,
    ) -> Result<Self, StoreError> {
        let dir_handle = File::open(&dir)
            .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", dir.display())))?;
        let next = gc.sizes.keys().next_back().map_or(1, |n| n + 1);
        let (file, len) = create_segment(&dir, &dir_handle, next)?;
        let mut c = Committer {
            dir,
            dir_handle,
            segment_size,
            active: next,
            file,
            len,
            gc,
            disk_bytes,
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
        match create_segment(&self.dir, &self.dir_handle, next) {
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
    fn collect_garbage(&mut self) {
        loop {
            let dead = self.gc.deletable(self.active);
            if dead.is_empty() {
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
        }
        self.publish_size();
    }
}

fn create_segment(dir: &Path, dir_handle: &File, n: u64) -> Result<(File, u64), StoreError> {
    let path = segment_path(dir, n);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::from_io(&e))?;
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    file.write_all(&header)
        .and_then(|_| file.sync_all())
        .and_then(|_| dir_handle.sync_all())
        .map_err(|e| {
            let _ = fs::remove_file(&path);
            StoreError::from_io(&e)
        })?;
    Ok((file, SEGMENT_HEADER_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::message::{Notify, RcptStatus, Recipient};

    fn envelope(id: u64) -> Envelope {
        Envelope {
            id: QueueId(id),
            kind: Default::default(),
            arrival: id,
            sender: "a@sender.test".into(),
            recipients: vec![Recipient::new(
                "b@example.test".into(),
                None,
                Notify::default(),
            )],
            size: 5,
            env_id: None,
            ret: None,
            smtputf8: false,
            eight_bit: false,
            client: Default::default(),
            held: false,
            delay_warned: false,
        }
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
                store
                    .append(Record::Message {
                        envelope: envelope(i),
                        body: format!("body{i}").into_bytes(),
                    })
                    .await
                    .unwrap();
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
                store
                    .append(Record::Message {
                        envelope: envelope(i),
                        body: vec![b'x'; 100],
                    })
                    .await
                    .unwrap();
            }
        }
        // simulate a crash in the middle of the next write
        let last = dir
            .path()
            .join("log")
            .join(seg_files(dir.path()).pop().unwrap());
        let (partial, _) = Record::Message {
            envelope: envelope(3),
            body: vec![b'y'; 100],
        }
        .encode();
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&partial[..partial.len() - 10]).unwrap();
        drop(f);
        let (_, rec, report) = open_store(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.torn_tails, 1);
        assert_eq!(rec.len(), 2);
    }

    #[tokio::test]
    async fn damaged_body_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = open_store(dir.path(), 1 << 20).unwrap();
        let a = store
            .append(Record::Message {
                envelope: envelope(1),
                body: b"hello world".to_vec(),
            })
            .await
            .unwrap();
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
            store
                .append(Record::Message {
                    envelope: envelope(i),
                    body: vec![b'z'; 200],
                })
                .await
                .unwrap();
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
            store
                .append(Record::Message {
                    envelope: envelope(i),
                    body: vec![b'm'; 4000],
                })
                .await
                .unwrap();
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
        store
            .append(Record::Message {
                envelope: envelope(1),
                body: vec![1; 100],
            })
            .await
            .unwrap();
        store
            .append(Record::Message {
                envelope: envelope(2),
                body: vec![2; 100],
            })
            .await
            .unwrap();
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
}
