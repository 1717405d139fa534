//! Damage found in the queue directory: records that failed their checks, bodies that failed
//! their checksum, segments that should exist and do not, a lost or garbled holds file.
//!
//! Why a list of its own: damage must be *loud* and must *last*. A damaged segment is kept
//! (the log's GC never deletes a segment with unacknowledged damage, see [`DamageLog::pinned`])
//! and every entry is reported (ERROR log, `mxpod_queue_damage`, `GET /v1/queue`) until an
//! operator acknowledges it with `mx-pod queue repair`. The list is saved in `DIR/damage.json`
//! (written atomically and fsync'd) so a restart neither forgets damage found at delivery time
//! nor reports again what an operator already acknowledged. Holds entries are not saved: they
//! are found again at every start while `holds.json` is missing or garbled, and end when
//! `holds.json` is written again (`mx-pod queue hold` / `release`).

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::message::QueueId;

/// What is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DamageKind {
    /// The segment's 16-byte header is not `MXPODSEG` with a known version; its records are
    /// still read.
    SegmentHeader,
    /// A record does not start with `MXR1`.
    RecordMagic,
    /// A record's lengths run past the end of its segment (or its meta is impossibly long).
    RecordLength,
    /// A record's header checksum (header and envelope/meta) does not match.
    RecordChecksum,
    /// A record passed its checksums but its meta is not what its kind says.
    RecordUndecodable,
    /// A message body does not match its checksum (found at recovery in the newest segment,
    /// or when read for delivery).
    BodyChecksum,
    /// A segment the manifest lists is not on disk: whatever it held is gone.
    MissingSegment,
    /// `log/MANIFEST` is gone (or garbled) while segments written with it exist: a missing
    /// segment cannot be noticed until the next start rebuilds it.
    Manifest,
    /// `holds.json` is gone from a directory that had one: every message is held until an
    /// operator says what to release.
    HoldsMissing,
    /// `holds.json` cannot be read or parsed: every message is held.
    HoldsUnreadable,
}

impl DamageKind {
    /// Every kind, for metric series that exist from the start.
    pub const ALL: [DamageKind; 10] = [
        DamageKind::SegmentHeader,
        DamageKind::RecordMagic,
        DamageKind::RecordLength,
        DamageKind::RecordChecksum,
        DamageKind::RecordUndecodable,
        DamageKind::BodyChecksum,
        DamageKind::MissingSegment,
        DamageKind::Manifest,
        DamageKind::HoldsMissing,
        DamageKind::HoldsUnreadable,
    ];

    /// The metric label and the JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            DamageKind::SegmentHeader => "segment_header",
            DamageKind::RecordMagic => "record_magic",
            DamageKind::RecordLength => "record_length",
            DamageKind::RecordChecksum => "record_checksum",
            DamageKind::RecordUndecodable => "record_undecodable",
            DamageKind::BodyChecksum => "body_checksum",
            DamageKind::MissingSegment => "missing_segment",
            DamageKind::Manifest => "manifest",
            DamageKind::HoldsMissing => "holds_missing",
            DamageKind::HoldsUnreadable => "holds_unreadable",
        }
    }

    /// Whether this is damage to the holds file (not acknowledged by repair: writing the holds
    /// ends it).
    pub fn is_holds(self) -> bool {
        matches!(self, DamageKind::HoldsMissing | DamageKind::HoldsUnreadable)
    }

    /// Whether this damage is about one record (counted by `mxpod_queue_corrupt_records_total`).
    pub fn is_record(self) -> bool {
        matches!(
            self,
            DamageKind::RecordMagic
                | DamageKind::RecordLength
                | DamageKind::RecordChecksum
                | DamageKind::RecordUndecodable
                | DamageKind::BodyChecksum
        )
    }
}

/// One piece of damage, as `GET /v1/queue` shows it under `damage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    pub what: DamageKind,
    /// The segment file name (`log/<16 hex>.seg`), when the damage is in (or is) a segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// Byte offset of the damaged region in its segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Length of the damaged region in bytes (up to the next valid record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    /// Messages whose envelope could be read from the damaged region: each went to
    /// `corrupt/<id>.json`, and its sender gets a DSN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<QueueId>,
    /// What the check found, for people.
    pub detail: String,
    /// When it was found (RFC 3339).
    pub detected: String,
    /// Set by `mx-pod queue repair`: no longer reported, no longer keeps the segment.
    #[serde(default)]
    pub acknowledged: bool,
}

impl Damage {
    pub fn new(what: DamageKind, segment: Option<u64>, detail: impl Into<String>) -> Self {
        Damage {
            what,
            segment: segment.map(segment_name),
            offset: None,
            len: None,
            messages: Vec::new(),
            detail: detail.into(),
            detected: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            acknowledged: false,
        }
    }

    pub fn at(mut self, offset: u64, len: u64) -> Self {
        self.offset = Some(offset);
        self.len = Some(len);
        self
    }

    /// The segment number, when the damage is in a segment.
    pub fn segment_number(&self) -> Option<u64> {
        let name = self.segment.as_deref()?;
        u64::from_str_radix(name.strip_suffix(".seg").unwrap_or(name), 16).ok()
    }

    /// Same damage (found again at a later start): same kind, segment and offset.
    fn same_place(&self, other: &Damage) -> bool {
        self.what == other.what && self.segment == other.segment && self.offset == other.offset
    }
}

/// A segment's file name.
pub fn segment_name(n: u64) -> String {
    format!("{n:016x}.seg")
}

/// The damage list, shared by the store (which finds damage and asks which segments to keep)
/// and the admin API (which shows and acknowledges it).
#[derive(Debug)]
pub struct DamageLog {
    path: PathBuf,
    entries: Vec<Damage>,
    /// Record damage found since start (for `mxpod_queue_corrupt_records_total`).
    records_found: u64,
}

/// The file the damage list is kept in.
pub const DAMAGE_FILE: &str = "damage.json";

impl DamageLog {
    /// Loads `DIR/damage.json`. A garbled file is reported as an error and replaced with what
    /// this start finds: it only ever lists damage, it never decides about mail.
    pub fn load(dir: &Path) -> Self {
        let path = dir.join(DAMAGE_FILE);
        let entries = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "unreadable damage list; starting a new one");
                Vec::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the damage list; starting a new one");
                Vec::new()
            }
        };
        DamageLog {
            path,
            entries,
            records_found: 0,
        }
    }

    /// Adds damage, logged as an ERROR. Damage already listed (same kind, segment and offset,
    /// found again at a later start) keeps its entry, acknowledged or not. Returns whether it
    /// was new.
    pub fn add(&mut self, d: Damage) -> bool {
        if let Some(old) = self.entries.iter_mut().find(|e| e.same_place(&d)) {
            for id in d.messages {
                if !old.messages.contains(&id) {
                    old.messages.push(id);
                }
            }
            return false;
        }
        tracing::error!(
            what = d.what.as_str(),
            segment = d.segment.as_deref().unwrap_or("-"),
            offset = ?d.offset,
            len = ?d.len,
            messages = ?d.messages.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            detail = %d.detail,
            "queue damage: kept for inspection until `mx-pod queue repair`"
        );
        if d.what.is_record() {
            self.records_found += 1;
        }
        self.entries.push(d);
        true
    }

    /// Drops holds entries (the holds file was written again).
    pub fn clear_holds(&mut self) {
        self.entries.retain(|e| !e.what.is_holds());
    }

    /// Forgets acknowledged entries whose segment is gone (deleted once nothing needed it);
    /// returns whether any was.
    pub fn forget_acknowledged_of(&mut self, gone: &[u64]) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| {
            !(e.acknowledged && e.what != DamageKind::MissingSegment)
                || e.segment_number().is_none_or(|s| !gone.contains(&s))
        });
        self.entries.len() != before
    }

    /// Unacknowledged damage, oldest first.
    pub fn active(&self) -> Vec<Damage> {
        self.entries
            .iter()
            .filter(|e| !e.acknowledged)
            .cloned()
            .collect()
    }

    /// Segments the GC must keep: those with unacknowledged damage.
    pub fn pinned(&self) -> BTreeSet<u64> {
        self.entries
            .iter()
            .filter(|e| !e.acknowledged)
            .filter_map(Damage::segment_number)
            .collect()
    }

    /// Record damage found since start.
    pub fn records_found(&self) -> u64 {
        self.records_found
    }

    /// Acknowledges the unacknowledged log damage (all, or that of one segment); holds damage
    /// is left alone. Returns what was acknowledged.
    pub fn acknowledge(&mut self, segment: Option<u64>) -> Vec<Damage> {
        let mut done = Vec::new();
        for e in self.entries.iter_mut() {
            if e.acknowledged || e.what.is_holds() {
                continue;
            }
            if segment.is_some() && e.segment_number() != segment {
                continue;
            }
            e.acknowledged = true;
            done.push(e.clone());
        }
        done
    }

    /// Saves the list (without holds entries): temporary file, fsync, rename, directory fsync.
    pub fn save(&self) -> io::Result<()> {
        let keep: Vec<&Damage> = self.entries.iter().filter(|e| !e.what.is_holds()).collect();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&keep).expect("damage serializes"))?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        fs::File::open(dir)?.sync_all()
    }

    /// Saves, logging a failure (the list stays in memory and is reported all the same).
    pub fn save_or_log(&self) {
        if let Err(e) = self.save() {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save the damage list");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_damage_survives_reload_and_is_not_reported_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DamageLog::load(dir.path());
        assert!(log.add(Damage::new(DamageKind::RecordChecksum, Some(3), "bad crc").at(100, 50)));
        assert!(log.add(Damage::new(DamageKind::HoldsMissing, None, "gone")));
        assert_eq!(log.pinned().into_iter().collect::<Vec<_>>(), vec![3]);
        assert_eq!(
            log.acknowledge(None).len(),
            1,
            "holds damage is not repaired"
        );
        assert!(log.pinned().is_empty());
        log.save().unwrap();
        let mut again = DamageLog::load(dir.path());
        assert!(
            again.active().is_empty(),
            "holds entries are not saved: {:?}",
            again.active()
        );
        // found again at the next start: stays acknowledged
        assert!(
            !again.add(Damage::new(DamageKind::RecordChecksum, Some(3), "bad crc").at(100, 50))
        );
        assert!(again.active().is_empty());
        again.forget_acknowledged_of(&[3]);
        assert!(again.add(Damage::new(DamageKind::RecordChecksum, Some(3), "bad crc").at(100, 50)));
    }
}
