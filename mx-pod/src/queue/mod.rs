//! The durable queue: what the SMTP side hands over and the replay side takes from.
//!
//! # Implementation summary
//! - [`Queue::enqueue`] returns only when the message is durable (see [`store`]); only then
//!   does the session answer `250`. The queue id is the message's identity; its position in the
//!   log is its arrival order.
//! - Every message has per-recipient state. Replay takes a *job*: one message on one route (a
//!   domain's primary, or the DSN route), oldest first ([`index`]). Its result per recipient is
//!   `Delivered` (done), `Failed` (done; the caller has already queued the DSN) or `Deferred`
//!   (retried after an exponential backoff chosen by the caller). A route-level failure
//!   (primary unreachable, `421`) puts the job back at the head, untouched, keeping the order.
//! - When every recipient is final the message is removed from the log. State changes are
//!   written without waiting for the disk: a crash can only repeat a delivery, never lose one.
//! - The queue is bounded by `max_bytes` (accepted but undelivered bytes): beyond it
//!   [`Queue::reserve`] fails and the session answers `452 4.3.1`; a full disk does the same.
//! - Holds: an admin can hold everything, one domain, or one message. Domain and global holds
//!   are kept in `DIR/holds.json`, message holds in the log, so both survive restarts.
//! - One writer: [`Queue::open`] first takes the directory's lock ([`lock`]); a second server on
//!   the same directory is refused before it reads, creates or deletes anything there.
//! - Damage ([`damage`]): recovery keeps every intact message and indexes the envelopes it can
//!   read from damaged records with an unreadable body ([`Queue::claim_damaged`] hands them to
//!   replay, which files them in `corrupt/` and bounces them). A lost or garbled `holds.json`
//!   holds everything (fail safe). All of it is listed by [`Queue::damage`] until
//!   [`Queue::repair`].

pub mod damage;
pub mod index;
pub mod lock;
pub mod message;
pub mod store;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::QueueConfig;
use damage::{Damage, DamageKind};
use index::{Entry, Index, RouteStats};
use message::{Envelope, MessageState, Micros, QueueId, RcptStatus, now_micros};
use store::{BodyRef, Record, RecoveryReport, Store, StoreError};

/// A queue error, as the SMTP and admin sides see it.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue is full ({used} of {limit} bytes used)")]
    Full { used: u64, limit: u64 },
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error("no message {0} in the queue")]
    NotFound(QueueId),
    #[error(transparent)]
    Locked(#[from] lock::LockError),
}

impl QueueError {
    /// True when the cause is lack of space (the client should try again later or elsewhere).
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            QueueError::Full { .. } | QueueError::Storage(StoreError::Full(_))
        )
    }
}

/// The result of one recipient's delivery attempt (what the outbound client reports).
pub use crate::outbound::RcptResult;

/// One message on one route, taken for delivery.
#[derive(Debug, Clone)]
pub struct Job {
    pub route: String,
    pub env: Envelope,
    pub body: BodyRef,
}

impl Job {
    /// The recipients this job delivers: pending ones on its route, with their index.
    pub fn recipients(&self) -> Vec<(usize, &message::Recipient)> {
        let dsn = self.env.kind == message::MessageKind::Dsn;
        self.env
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.status.is_final() && (dsn || r.domain == self.route))
            .collect()
    }
}

/// Holds that survive restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Holds {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    domains: Vec<String>,
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

/// How many finished messages are remembered for `GET /v1/queue/messages/{id}`.
pub const FINISHED_KEPT: usize = 1000;

struct Inner {
    store: Store,
    state: Mutex<State>,
    /// The last messages that left the queue (delivered, bounced, expired, deleted), newest last,
    /// with their final per-recipient state: so "what happened to message X" has an answer.
    finished: Mutex<std::collections::VecDeque<Envelope>>,
    work: Notify,
    max_bytes: u64,
    next_id: AtomicU64,
    dir: PathBuf,
}

struct State {
    index: Index,
    reserved: u64,
    holds: Holds,
    /// Messages whose record was damaged (envelope read, body unreadable) and why; they leave
    /// through [`Queue::claim_damaged`].
    damaged: std::collections::HashMap<QueueId, String>,
}

/// Space set aside for a message being received; released when dropped.
pub struct Reservation {
    queue: Queue,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.reserved = st.reserved.saturating_sub(self.bytes);
    }
}

/// Messages the expiry sweep found.
#[derive(Debug, Default)]
pub struct ExpiryWork {
    /// Past `retention`: bounce the pending recipients, then remove.
    pub expired: Vec<Job>,
    /// Past `delay_warning` and not yet warned.
    pub delayed: Vec<Job>,
}

impl Queue {
    /// Locks the queue directory (creating it, mode 0700, when missing), then rebuilds the index
    /// from disk. The lock is held until the log's committer stops.
    pub fn open(cfg: &QueueConfig) -> Result<(Queue, RecoveryReport), QueueError> {
        let lock = lock::DirLock::exclusive(&cfg.dir)?;
        // read before the store writes a manifest: a directory without one has never had a
        // holds file it could have lost
        let (holds, holds_damage) = read_holds(&cfg.dir, store::manifest_exists(&cfg.dir))?;
        let (store, recovered, report) = Store::open(&cfg.dir, cfg.segment_size.0, lock)?;
        if let Some(d) = holds_damage {
            store.damage().add(d);
        }
        let now = now_micros();
        let mut index = Index::default();
        let mut max_id = 0;
        let mut damaged = std::collections::HashMap::new();
        for r in recovered {
            max_id = max_id.max(r.envelope.id.0);
            if let Some(why) = r.damaged {
                damaged.insert(r.envelope.id, why);
            }
            index.insert(
                Entry {
                    env: r.envelope,
                    body: r.body,
                    pos: r.pos,
                },
                now,
            );
        }
        for d in &holds.domains {
            index.route_mut(d).route_held = true;
        }
        let queue = Queue {
            inner: Arc::new(Inner {
                store,
                state: Mutex::new(State {
                    index,
                    reserved: 0,
                    holds,
                    damaged,
                }),
                finished: Mutex::new(std::collections::VecDeque::new()),
                work: Notify::new(),
                max_bytes: cfg.max_bytes.0,
                next_id: AtomicU64::new(max_id.saturating_add(1).max(now)),
                dir: cfg.dir.clone(),
            }),
        };
        Ok((queue, report))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // a panic while holding the lock leaves consistent data (no partial updates)
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh queue id.
    pub fn new_id(&self) -> QueueId {
        QueueId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Sets aside `bytes` for a message; fails when the queue would exceed `max_bytes`.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, QueueError> {
        let mut st = self.lock();
        let used = st.index.bytes() + st.reserved;
        if used + bytes > self.inner.max_bytes {
            return Err(QueueError::Full {
                used,
                limit: self.inner.max_bytes,
            });
        }
        st.reserved += bytes;
        drop(st);
        Ok(Reservation {
            queue: self.clone(),
            bytes,
        })
    }

    /// Stores a message durably and makes it available for replay.
    pub async fn enqueue(
        &self,
        env: Envelope,
        body: Vec<u8>,
        mut reservation: Reservation,
    ) -> Result<QueueId, QueueError> {
        let id = env.id;
        let appended = self
            .inner
            .store
            .append(Record::Message {
                envelope: env.clone(),
                body,
            })
            .await?;
        let body = appended.body.expect("message records have a body");
        {
            let mut st = self.lock();
            st.index.insert(
                Entry {
                    env,
                    body,
                    pos: appended.pos,
                },
                now_micros(),
            );
            // hand the reserved bytes over to the index in one step (never under-counted)
            st.reserved = st.reserved.saturating_sub(reservation.bytes);
            reservation.bytes = 0;
        }
        self.inner.work.notify_waiters();
        Ok(id)
    }

    /// Takes the oldest deliverable message, preferring route `prefer`; `can_take(route,
    /// in_flight)` lets the caller apply per-route limits and backoff.
    pub fn take(
        &self,
        prefer: Option<&str>,
        can_take: impl FnMut(&str, usize) -> bool,
    ) -> Option<Job> {
        let mut st = self.lock();
        if st.holds.all {
            return None;
        }
        st.index
            .take(now_micros(), prefer, can_take)
            .map(|(route, e)| Job {
                route,
                env: e.env,
                body: e.body,
            })
    }

    /// Reads a job's body, checking it against its checksum.
    pub fn read_body(&self, job: &Job) -> Result<Vec<u8>, StoreError> {
        self.inner.store.read_body(job.env.id, job.body)
    }

    /// Whether no older message of `job`'s route is in flight: `job` may be committed now.
    pub fn is_turn(&self, job: &Job) -> bool {
        self.lock()
            .index
            .is_oldest_in_flight(&job.route, job.env.id)
    }

    /// Waits until no older message of `job`'s route is in flight (each of them delivered,
    /// deferred or put back): the moment `job` may be committed at the primary.
    pub async fn wait_turn(&self, job: &Job) {
        loop {
            // registered before the check: a change between check and wait is not missed
            let changed = self.inner.work.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_turn(job) {
                return;
            }
            changed.await;
        }
    }

    /// Puts a job back untouched (route failure): it stays at the head of its route.
    pub fn put_back(&self, job: &Job) {
        self.lock()
            .index
            .put_back(&job.route, job.env.id, now_micros());
        self.inner.work.notify_waiters();
    }

    /// Records the per-recipient results of a job. `backoff(attempts)` gives the retry delay
    /// of a deferred recipient. Returns the updated envelope.
    pub fn complete(
        &self,
        job: &Job,
        results: &[(usize, RcptResult)],
        backoff: impl Fn(u32) -> Duration,
    ) -> Option<Envelope> {
        let now = now_micros();
        let mut st = self.lock();
        let mut env = st.index.get(job.env.id)?.env.clone();
        for (i, result) in results {
            let Some(r) = env.recipients.get_mut(*i) else {
                continue;
            };
            match result {
                RcptResult::Delivered(reply) => {
                    r.status = RcptStatus::Delivered {
                        at: now,
                        reply: reply.clone(),
                    }
                }
                RcptResult::Failed(reply) => {
                    r.status = RcptStatus::Failed {
                        at: now,
                        reply: reply.clone(),
                    }
                }
                RcptResult::Deferred(reply) => {
                    r.attempts += 1;
                    r.next_attempt = now + backoff(r.attempts).as_micros() as u64;
                    r.last_error = Some(reply.clone());
                }
            }
        }
        let record = if env.is_done() {
            st.index.remove(env.id);
            Record::Remove(env.id)
        } else {
            st.index.update(env.clone(), now);
            st.index.put_back(&job.route, env.id, now);
            Record::State(MessageState::of(&env))
        };
        drop(st);
        if let Err(e) = self.inner.store.append_nowait(record) {
            tracing::error!(id = %env.id, error = %e, "cannot record delivery state");
        }
        if env.is_done() {
            self.remember_finished(env.clone());
        }
        self.inner.work.notify_waiters();
        Some(env)
    }

    fn remember_finished(&self, env: Envelope) {
        let mut f = self
            .inner
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if f.len() >= FINISHED_KEPT {
            f.pop_front();
        }
        f.push_back(env);
    }

    /// A message that recently left the queue, with its final per-recipient state (not kept
    /// across restarts; the last [`FINISHED_KEPT`]).
    pub fn finished(&self, id: QueueId) -> Option<Envelope> {
        let f = self
            .inner
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f.iter().rev().find(|e| e.id == id).cloned()
    }

    /// Removes a message (admin delete, expiry, damaged body); `Err` when it is unknown or a
    /// worker is delivering it right now.
    pub async fn remove(&self, id: QueueId) -> Result<Envelope, QueueError> {
        let env = {
            let mut st = self.lock();
            if !st.index.in_flight_routes(id).is_empty() {
                return Err(QueueError::Storage(StoreError::Io(format!(
                    "message {id} is being delivered right now; try again"
                ))));
            }
            st.index.remove(id).ok_or(QueueError::NotFound(id))?.env
        };
        self.inner.store.append(Record::Remove(id)).await?;
        self.remember_finished(env.clone());
        self.inner.work.notify_waiters();
        Ok(env)
    }

    /// Holds or releases mail: one message (`id`), one domain, or everything.
    pub async fn set_hold(
        &self,
        held: bool,
        domain: Option<&str>,
        id: Option<QueueId>,
    ) -> Result<usize, QueueError> {
        if let Some(id) = id {
            self.update_envelope(id, |env| env.held = held).await?;
            self.inner.work.notify_waiters();
            return Ok(1);
        }
        // the admin edge gives the route form already; normalising again costs nothing and keeps
        // every caller on the one route a domain has
        let domain = domain.map(message::route_of);
        let domain = domain.as_deref();
        let holds = {
            let mut st = self.lock();
            match domain {
                Some(d) => {
                    let d = d.to_owned();
                    st.index.route_mut(&d).route_held = held;
                    st.holds.domains.retain(|x| *x != d);
                    if held {
                        st.holds.domains.push(d);
                    }
                }
                None => {
                    st.holds.all = held;
                    if !held {
                        for d in std::mem::take(&mut st.holds.domains) {
                            st.index.route_mut(&d).route_held = false;
                        }
                    }
                }
            }
            st.holds.clone()
        };
        write_holds(&self.inner.dir, &holds)
            .map_err(|e| QueueError::Storage(StoreError::Io(format!("cannot save holds: {e}"))))?;
        // the operator has said what is held: the holds file is whole again
        self.inner.store.damage().clear_holds();
        self.inner.work.notify_waiters();
        Ok(self
            .stats()
            .iter()
            .filter(|s| domain.is_none_or(|d| s.route == d))
            .map(|s| s.messages)
            .sum())
    }

    /// Makes deferred mail of a domain (or all) due now. Returns how many messages moved.
    pub fn flush(&self, domain: Option<&str>) -> usize {
        let lower = domain.map(message::route_of);
        let n = self.lock().index.flush(lower.as_deref());
        self.inner.work.notify_waiters();
        n
    }

    /// Whether everything is held.
    pub fn all_held(&self) -> bool {
        self.lock().holds.all
    }

    /// Per-route figures.
    pub fn stats(&self) -> Vec<RouteStats> {
        self.lock().index.stats()
    }

    /// Total messages and bytes queued.
    pub fn totals(&self) -> (usize, u64) {
        let st = self.lock();
        (st.index.len(), st.index.bytes())
    }

    /// Bytes of the log's files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.store.disk_bytes()
    }

    /// Envelopes of a route (or all), oldest first.
    pub fn list(&self, route: Option<&str>, limit: usize) -> Vec<Envelope> {
        let lower = route.map(message::route_of);
        self.lock()
            .index
            .list(lower.as_deref(), limit)
            .into_iter()
            .map(|e| e.env.clone())
            .collect()
    }

    /// One message's envelope.
    pub fn get(&self, id: QueueId) -> Option<Envelope> {
        self.lock().index.get(id).map(|e| e.env.clone())
    }

    /// Finds messages past retention (`expired`) or past the delay warning and not yet warned
    /// (`delayed`), skipping those in flight. Expired messages come back *claimed*: no worker can
    /// take them until they are finished with [`Queue::complete`] or given back with
    /// [`Queue::unclaim`], so an expiry and a delivery never race.
    pub fn expiry_scan(
        &self,
        now: Micros,
        retention: Duration,
        delay_warning: Duration,
    ) -> ExpiryWork {
        let mut st = self.lock();
        let mut work = ExpiryWork::default();
        let retention = retention.as_micros() as u64;
        let warn = delay_warning.as_micros() as u64;
        let ids: Vec<QueueId> = st.index.ids().copied().collect();
        for id in ids {
            let Some(e) = st.index.get(id) else { continue };
            let age = now.saturating_sub(e.env.arrival);
            if age >= retention {
                if let Some(e) = st.index.claim(id) {
                    work.expired.push(Job {
                        route: String::new(),
                        env: e.env,
                        body: e.body,
                    });
                }
            } else if age >= warn && !e.env.delay_warned && st.index.in_flight_routes(id).is_empty()
            {
                work.delayed.push(Job {
                    route: String::new(),
                    env: e.env.clone(),
                    body: e.body,
                });
            }
        }
        work
    }

    /// Gives back a message claimed by [`Queue::expiry_scan`].
    pub fn unclaim(&self, job: &Job) {
        self.lock().index.unclaim(job.env.id, now_micros());
        self.inner.work.notify_waiters();
    }

    /// Marks the delay warning of a message as sent.
    pub async fn mark_delay_warned(&self, id: QueueId) -> Result<(), QueueError> {
        self.update_envelope(id, |env| env.delay_warned = true)
            .await
    }

    /// Changes one queued message's envelope with `change`, in the index and then as a state
    /// record in the log, so the change survives a restart.
    async fn update_envelope(
        &self,
        id: QueueId,
        change: impl FnOnce(&mut Envelope),
    ) -> Result<(), QueueError> {
        let state = {
            let mut st = self.lock();
            let mut env = st
                .index
                .get(id)
                .ok_or(QueueError::NotFound(id))?
                .env
                .clone();
            change(&mut env);
            st.index.update(env.clone(), now_micros());
            MessageState::of(&env)
        };
        self.inner.store.append(Record::State(state)).await?;
        Ok(())
    }

    /// Reads a message's body for a DSN or an admin (`Job` from [`Queue::expiry_scan`]).
    pub fn read_body_of(&self, id: QueueId) -> Result<Vec<u8>, QueueError> {
        let body = self
            .lock()
            .index
            .get(id)
            .ok_or(QueueError::NotFound(id))?
            .body;
        Ok(self.inner.store.read_body(id, body)?)
    }

    /// Waits until new work may be available, or `max` passes.
    pub async fn wait_for_work(&self, max: Duration) {
        let due = self.lock().index.next_due();
        let wait = match due {
            Some(d) => Duration::from_micros(d.saturating_sub(now_micros())).min(max),
            None => max,
        };
        let _ = tokio::time::timeout(wait, self.inner.work.notified()).await;
    }

    /// Wakes every waiting worker (settings changed).
    pub fn wake(&self) {
        self.inner.work.notify_waiters();
    }

    /// Waits until everything appended so far is durable.
    pub async fn sync(&self) -> Result<(), QueueError> {
        Ok(self.inner.store.sync().await?)
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Claims every message whose record was damaged (see [`store::Recovered::damaged`]), with
    /// why, like [`Queue::expiry_scan`] claims expired mail: finish each with
    /// [`Queue::complete`] or give it back with [`Queue::unclaim`].
    pub fn claim_damaged(&self) -> Vec<(Job, String)> {
        let mut st = self.lock();
        let ids: Vec<QueueId> = st.damaged.keys().copied().collect();
        let mut out = Vec::new();
        for id in ids {
            if st.index.get(id).is_none() {
                st.damaged.remove(&id);
                continue;
            }
            if let Some(e) = st.index.claim(id) {
                let why = st.damaged.get(&id).cloned().unwrap_or_default();
                out.push((
                    Job {
                        route: String::new(),
                        env: e.env,
                        body: e.body,
                    },
                    why,
                ));
            }
        }
        out
    }

    /// Unacknowledged damage in the queue directory (log and holds), oldest first.
    pub fn damage(&self) -> Vec<Damage> {
        self.inner.store.damage().active()
    }

    /// Record damage found since start (for `mxpod_queue_corrupt_records_total`).
    pub fn corrupt_records_found(&self) -> u64 {
        self.inner.store.damage().records_found()
    }

    /// `mx-pod queue repair`: acknowledges the log damage (all, or one segment's). What was
    /// damaged has already been dealt with (intact messages kept, readable envelopes in
    /// `corrupt/` with a DSN, the rest reported); acknowledging stops the reports and lets the
    /// GC delete the damaged segment once no intact message in it is still queued. It never
    /// releases held mail: a lost holds file ends with `hold` or `release`.
    pub fn repair(&self, segment: Option<u64>) -> Result<Vec<Damage>, QueueError> {
        let done = {
            let mut log = self.inner.store.damage();
            let done = log.acknowledge(segment);
            log.save().map_err(|e| {
                QueueError::Storage(StoreError::Io(format!("cannot save the damage list: {e}")))
            })?;
            done
        };
        for d in &done {
            tracing::warn!(what = d.what.as_str(), segment = d.segment.as_deref().unwrap_or("-"), offset = ?d.offset, "queue damage acknowledged by admin");
        }
        Ok(done)
    }
}

/// Reads `holds.json`. Fail safe: a garbled or unreadable file, or a missing one in a directory
/// that had one (`managed`: this version keeps a holds file from its first start), holds
/// everything and comes back as damage. A directory without one (new, or from a version
/// before the manifest) gets an empty holds file written, so its loss can be noticed later.
fn read_holds(dir: &Path, managed: bool) -> Result<(Holds, Option<Damage>), QueueError> {
    let (holds, damage) = read_holds_file(dir, managed)?;
    // a holds file written before routes were normalised may name a domain by its U-label
    let mut domains: Vec<String> = Vec::new();
    for d in holds.domains.iter().map(|d| message::route_of(d)) {
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    Ok((Holds { domains, ..holds }, damage))
}

fn read_holds_file(dir: &Path, managed: bool) -> Result<(Holds, Option<Damage>), QueueError> {
    let path = dir.join("holds.json");
    // the file cannot say what is held: everything is, and the damage says why
    let hold_all = |kind: DamageKind, why: String| {
        let held = Holds {
            all: true,
            domains: vec![],
        };
        let detail = format!(
            "{} {why} until an operator releases it (mx-pod queue release)",
            path.display()
        );
        Ok((held, Some(Damage::new(kind, None, detail))))
    };
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(h) => Ok((h, None)),
            Err(e) => hold_all(
                DamageKind::HoldsUnreadable,
                format!("cannot be parsed ({e}): holding everything"),
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !managed => {
            let holds = Holds::default();
            write_holds(dir, &holds).map_err(|e| {
                QueueError::Storage(StoreError::Io(format!(
                    "cannot write {}: {e}",
                    path.display()
                )))
            })?;
            Ok((holds, None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => hold_all(
            DamageKind::HoldsMissing,
            "is gone: which domains were held is unknown, so everything is held".into(),
        ),
        Err(e) => hold_all(
            DamageKind::HoldsUnreadable,
            format!("cannot be read ({e}): holding everything"),
        ),
    }
}

fn write_holds(dir: &Path, holds: &Holds) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join("holds.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(holds).expect("holds serialize"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("holds.json"))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> QueueConfig {
        QueueConfig {
            dir: dir.to_owned(),
            retention: crate::config::HumanDuration(Duration::from_secs(3600)),
            delay_warning: crate::config::HumanDuration(Duration::from_secs(600)),
            max_bytes: crate::config::Size(1 << 30),
            segment_size: crate::config::Size(1 << 20),
        }
    }

    /// Opens the queue once its previous handle's committer has let the lock go.
    fn open(dir: &Path) -> Queue {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Queue::open(&config(dir)) {
                Ok((q, _)) => return q,
                Err(QueueError::Locked(e)) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(QueueError::Locked(_)) => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn lost_or_garbled_holds_hold_everything_and_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        assert!(!q.all_held());
        assert!(q.damage().is_empty());
        assert!(
            dir.path().join("holds.json").exists(),
            "written at the first start"
        );
        q.set_hold(true, Some("example.test"), None).await.unwrap();
        drop(q);

        std::fs::remove_file(dir.path().join("holds.json")).unwrap();
        let q = open(dir.path());
        assert!(q.all_held(), "fail safe");
        let d = q.damage();
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].what, DamageKind::HoldsMissing);
        assert_eq!(
            q.repair(None).unwrap().len(),
            0,
            "repair leaves holds alone"
        );
        assert!(q.all_held());
        drop(q);

        std::fs::write(dir.path().join("holds.json"), b"{\"all\": fa").unwrap();
        let q = open(dir.path());
        assert!(q.all_held(), "fail safe");
        assert_eq!(q.damage()[0].what, DamageKind::HoldsUnreadable);
        // the operator decides: writing the holds ends the report
        q.set_hold(false, None, None).await.unwrap();
        assert!(!q.all_held());
        assert!(q.damage().is_empty());
        drop(q);
        let q = open(dir.path());
        assert!(!q.all_held());
        assert!(q.damage().is_empty());
    }

    #[tokio::test]
    async fn a_directory_from_before_the_manifest_gets_an_empty_holds_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        let q = open(dir.path());
        assert!(
            !q.all_held(),
            "no holds file and no manifest: nothing was held"
        );
        assert!(q.damage().is_empty());
        assert!(dir.path().join("holds.json").exists());
    }
}
