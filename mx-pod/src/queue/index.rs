//! The in-memory view of the queue: per-route FIFO by arrival, with due times and holds.
//!
//! A *route* is where a message's pending recipients go: a served domain (its primary) or
//! [`DSN_ROUTE`] for the notifications we send. A message with recipients in two domains sits
//! in two routes and is delivered to each on its own. Within a route a message is in exactly one
//! of four places: `ready` (may be taken now, oldest first), `waiting` (a temporary failure's
//! retry time is in the future), `in_flight` (a replay worker has it) or `held` (an admin held
//! it). Arrival order is the message's position in the log. Pure data: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    message::{Envelope, Micros, QueueId},
    store::{BodyRef, LogPos},
};

/// The route of delivery status notifications we generate.
pub const DSN_ROUTE: &str = "_dsn";

/// A queued message as the index keeps it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub env: Envelope,
    pub body: BodyRef,
    pub pos: LogPos,
}

impl Entry {
    /// The routes this message still has pending recipients on.
    pub fn routes(&self) -> Vec<String> {
        if self.env.kind == super::message::MessageKind::Dsn {
            if self.env.is_done() {
                vec![]
            } else {
                vec![DSN_ROUTE.to_owned()]
            }
        } else {
            self.env.pending_domains()
        }
    }

    /// Whether a recipient belongs to `route`.
    pub fn on_route(&self, rcpt_domain: &str, route: &str) -> bool {
        (route == DSN_ROUTE && self.env.kind == super::message::MessageKind::Dsn)
            || rcpt_domain == route
    }

    /// The earliest retry time of this message's pending recipients on `route`.
    fn due(&self, route: &str) -> Micros {
        self.env
            .recipients
            .iter()
            .filter(|r| !r.status.is_final() && self.on_route(&r.domain, route))
            .map(|r| r.next_attempt)
            .min()
            .unwrap_or(0)
    }
}

/// One route's queue.
#[derive(Debug, Default)]
pub struct RouteQueue {
    ready: BTreeMap<LogPos, QueueId>,
    waiting: BTreeSet<(Micros, LogPos, QueueId)>,
    waiting_due: HashMap<QueueId, Micros>,
    in_flight: BTreeMap<LogPos, QueueId>,
    held: BTreeMap<LogPos, QueueId>,
    /// Held by an admin as a whole.
    pub route_held: bool,
    bytes: u64,
}

impl RouteQueue {
    pub fn len(&self) -> usize {
        self.ready.len() + self.waiting.len() + self.in_flight.len() + self.held.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The oldest position in this route (its head, in arrival order).
    fn oldest(&self) -> Option<(LogPos, QueueId)> {
        let a = self.ready.iter().next().map(|(p, i)| (*p, *i));
        let b = self.waiting.iter().map(|(_, p, i)| (*p, *i)).min();
        let c = self.in_flight.iter().next().map(|(p, i)| (*p, *i));
        let d = self.held.iter().next().map(|(p, i)| (*p, *i));
        [a, b, c, d].into_iter().flatten().min()
    }

    fn remove(&mut self, pos: LogPos, id: QueueId) -> bool {
        if self.ready.remove(&pos).is_some()
            || self.in_flight.remove(&pos).is_some()
            || self.held.remove(&pos).is_some()
        {
            return true;
        }
        if let Some(due) = self.waiting_due.remove(&id) {
            self.waiting.remove(&(due, pos, id));
            return true;
        }
        false
    }

    /// Moves messages whose retry time has come into `ready`.
    fn promote(&mut self, now: Micros) {
        while let Some(&(due, pos, id)) = self.waiting.first() {
            if due > now {
                break;
            }
            self.waiting.pop_first();
            self.waiting_due.remove(&id);
            self.ready.insert(pos, id);
        }
    }

    /// The earliest retry time in `waiting`.
    pub fn next_due(&self) -> Option<Micros> {
        self.waiting.first().map(|(d, _, _)| *d)
    }
}

/// Per-route figures for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStats {
    pub route: String,
    pub messages: usize,
    pub bytes: u64,
    pub oldest_arrival: Option<Micros>,
    pub held: bool,
    pub in_flight: usize,
}

/// All queued messages and their routes.
#[derive(Debug, Default)]
pub struct Index {
    messages: HashMap<QueueId, Entry>,
    routes: BTreeMap<String, RouteQueue>,
    bytes: u64,
    rr: usize,
}

impl Index {
    pub fn len(&self) -> usize {
        self.messages.len()
    }
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn get(&self, id: QueueId) -> Option<&Entry> {
        self.messages.get(&id)
    }
    pub fn ids(&self) -> impl Iterator<Item = &QueueId> {
        self.messages.keys()
    }
    pub fn route(&self, name: &str) -> Option<&RouteQueue> {
        self.routes.get(name)
    }

    /// Makes sure a route exists (so a hold can be placed on a domain with no mail yet).
    pub fn route_mut(&mut self, name: &str) -> &mut RouteQueue {
        self.routes.entry(name.to_owned()).or_default()
    }

    /// Adds a message to each of its routes.
    pub fn insert(&mut self, entry: Entry, now: Micros) {
        let id = entry.env.id;
        self.bytes += entry.env.size;
        for route in entry.routes() {
            self.place(&entry, &route, now);
        }
        self.messages.insert(id, entry);
    }

    fn place(&mut self, entry: &Entry, route: &str, now: Micros) {
        let due = entry.due(route);
        let q = self.routes.entry(route.to_owned()).or_default();
        let (pos, id) = (entry.pos, entry.env.id);
        q.bytes += entry.env.size;
        if entry.env.held {
            q.held.insert(pos, id);
        } else if due > now {
            q.waiting.insert((due, pos, id));
            q.waiting_due.insert(id, due);
        } else {
            q.ready.insert(pos, id);
        }
    }

    fn unplace(&mut self, entry: &Entry, route: &str) {
        if let Some(q) = self.routes.get_mut(route)
            && q.remove(entry.pos, entry.env.id)
        {
            q.bytes = q.bytes.saturating_sub(entry.env.size);
        }
    }

    /// Removes a message from the index and all its routes.
    pub fn remove(&mut self, id: QueueId) -> Option<Entry> {
        let entry = self.messages.remove(&id)?;
        self.bytes = self.bytes.saturating_sub(entry.env.size);
        let routes: Vec<String> = self.routes.keys().cloned().collect();
        for r in routes {
            self.unplace(&entry, &r);
        }
        Some(entry)
    }

    /// Replaces a message's envelope (after delivery results or a hold) and re-places it in its
    /// routes; routes with a job in flight keep it there.
    pub fn update(&mut self, env: Envelope, now: Micros) {
        let Some(mut entry) = self.messages.remove(&env.id) else {
            return;
        };
        let old_routes = entry.routes();
        let flying: Vec<String> = old_routes
            .iter()
            .filter(|r| {
                self.routes
                    .get(*r)
                    .is_some_and(|q| q.in_flight.contains_key(&entry.pos))
            })
            .cloned()
            .collect();
        for r in &old_routes {
            self.unplace(&entry, r);
        }
        entry.env = env;
        for r in entry.routes() {
            if flying.contains(&r) {
                let q = self.routes.entry(r).or_default();
                q.in_flight.insert(entry.pos, entry.env.id);
                q.bytes += entry.env.size;
            } else {
                self.place(&entry, &r, now);
            }
        }
        self.messages.insert(entry.env.id, entry);
    }

    /// Takes the oldest ready message of a route that `can_take` allows, preferring `prefer`,
    /// then the others in turn. Marks it in flight.
    pub fn take(
        &mut self,
        now: Micros,
        prefer: Option<&str>,
        mut can_take: impl FnMut(&str, usize) -> bool,
    ) -> Option<(String, Entry)> {
        let names: Vec<String> = self.routes.keys().cloned().collect();
        if names.is_empty() {
            return None;
        }
        self.rr = self.rr.wrapping_add(1);
        let start = self.rr % names.len();
        let order = prefer
            .map(str::to_owned)
            .into_iter()
            .chain(names[start..].iter().cloned())
            .chain(names[..start].iter().cloned());
        for name in order {
            let Some(q) = self.routes.get_mut(&name) else {
                continue;
            };
            if q.route_held {
                continue;
            }
            q.promote(now);
            if q.ready.is_empty() || !can_take(&name, q.in_flight.len()) {
                continue;
            }
            let (pos, id) = q.ready.pop_first().expect("not empty");
            q.in_flight.insert(pos, id);
            let entry = self
                .messages
                .get(&id)
                .cloned()
                .expect("indexed message exists");
            return Some((name, entry));
        }
        None
    }

    /// Ends a job without a result (route failure): the message goes back to the head, in order.
    pub fn put_back(&mut self, route: &str, id: QueueId, now: Micros) {
        let Some(entry) = self.messages.get(&id).cloned() else {
            return;
        };
        self.unplace(&entry, route);
        if entry.routes().iter().any(|r| r == route) {
            self.place(&entry, route, now);
        }
    }

    /// The earliest retry time over all routes.
    pub fn next_due(&self) -> Option<Micros> {
        self.routes.values().filter_map(|q| q.next_due()).min()
    }

    /// Figures for every route that has mail or a hold.
    pub fn stats(&self) -> Vec<RouteStats> {
        self.routes
            .iter()
            .filter(|(_, q)| !q.is_empty() || q.route_held)
            .map(|(name, q)| RouteStats {
                route: name.clone(),
                messages: q.len(),
                bytes: q.bytes,
                oldest_arrival: q
                    .oldest()
                    .and_then(|(_, id)| self.messages.get(&id))
                    .map(|e| e.env.arrival),
                held: q.route_held,
                in_flight: q.in_flight.len(),
            })
            .collect()
    }

    /// Messages of one route (or all), oldest first.
    pub fn list(&self, route: Option<&str>, limit: usize) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = match route {
            Some(r) => self
                .messages
                .values()
                .filter(|e| e.routes().iter().any(|x| x == r))
                .collect(),
            None => self.messages.values().collect(),
        };
        v.sort_by_key(|e| e.pos);
        v.truncate(limit);
        v
    }

    /// Makes every waiting message of a route (or all) ready now.
    pub fn flush(&mut self, route: Option<&str>) -> usize {
        let mut n = 0;
        for (name, q) in self.routes.iter_mut() {
            if route.is_some_and(|r| r != name) {
                continue;
            }
            n += q.waiting.len();
            q.promote(Micros::MAX);
        }
        n
    }

    /// Takes a message out of every route (marks it in flight everywhere) so no worker picks it
    /// up; `None` when it is unknown or already in flight somewhere.
    pub fn claim(&mut self, id: QueueId) -> Option<Entry> {
        if !self.in_flight_routes(id).is_empty() {
            return None;
        }
        let entry = self.messages.get(&id)?.clone();
        for route in entry.routes() {
            self.unplace(&entry, &route);
            let q = self.routes.entry(route).or_default();
            q.in_flight.insert(entry.pos, id);
            q.bytes += entry.env.size;
        }
        Some(entry)
    }

    /// Undoes [`Index::claim`].
    pub fn unclaim(&mut self, id: QueueId, now: Micros) {
        let Some(entry) = self.messages.get(&id).cloned() else {
            return;
        };
        for route in entry.routes() {
            self.put_back(&route, id, now);
        }
    }

    /// Whether no message older than `id` is in flight on `route`: then `id` may be committed
    /// at the primary without overtaking one (replay's commit order).
    pub fn is_oldest_in_flight(&self, route: &str, id: QueueId) -> bool {
        let (Some(q), Some(e)) = (self.routes.get(route), self.messages.get(&id)) else {
            return true;
        };
        q.in_flight.range(..e.pos).next().is_none()
    }

    /// Routes a message is in flight on.
    pub fn in_flight_routes(&self, id: QueueId) -> Vec<String> {
        let Some(e) = self.messages.get(&id) else {
            return vec![];
        };
        self.routes
            .iter()
            .filter(|(_, q)| q.in_flight.contains_key(&e.pos))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, rcpts: &[&str]) -> Entry {
        Entry {
            env: Envelope {
                arrival: id * 10,
                size: 100,
                ..Envelope::for_test(id, "s@sender.test", rcpts)
            },
            body: BodyRef {
                segment: 1,
                offset: 0,
                len: 100,
                crc: 0,
                unreadable: false,
            },
            pos: (1, id),
        }
    }

    fn take_all(ix: &mut Index, route: &str) -> Vec<u64> {
        let mut out = vec![];
        while let Some((_, e)) = ix.take(0, Some(route), |r, _| r == route) {
            out.push(e.env.id.0);
        }
        out
    }

    #[test]
    fn fifo_by_log_position_not_insert_order() {
        let mut ix = Index::default();
        for id in [3, 1, 2] {
            ix.insert(entry(id, &["a@x.test"]), 0);
        }
        assert_eq!(take_all(&mut ix, "x.test"), vec![1, 2, 3]);
    }

    #[test]
    fn multi_domain_message_sits_in_each_route() {
        let mut ix = Index::default();
        ix.insert(entry(1, &["a@x.test", "b@y.test"]), 0);
        assert_eq!(take_all(&mut ix, "x.test"), vec![1]);
        assert_eq!(take_all(&mut ix, "y.test"), vec![1]);
        let stats = ix.stats();
        assert_eq!(stats.len(), 2);
        assert!(stats.iter().all(|s| s.in_flight == 1));
    }

    #[test]
    fn a_message_commits_only_when_no_older_one_is_in_flight() {
        let mut ix = Index::default();
        for id in 1..=3 {
            ix.insert(entry(id, &["a@x.test"]), 0);
        }
        let route = |r: &str, _| r == "x.test";
        let first = ix.take(0, None, route).unwrap().1.env.id;
        let second = ix.take(0, None, route).unwrap().1.env.id;
        assert!(ix.is_oldest_in_flight("x.test", first));
        assert!(
            !ix.is_oldest_in_flight("x.test", second),
            "1 is still in flight"
        );
        ix.put_back("x.test", first, 0);
        assert!(
            ix.is_oldest_in_flight("x.test", second),
            "1 is back in the queue"
        );
        let again = ix.take(0, None, route).unwrap().1.env.id;
        assert_eq!(again, first, "the put-back message is the head again");
        assert!(!ix.is_oldest_in_flight("x.test", second));
        ix.remove(first);
        assert!(ix.is_oldest_in_flight("x.test", second), "1 delivered");
        assert!(
            ix.is_oldest_in_flight("y.test", second),
            "no such route: nothing to wait for"
        );
    }

    #[test]
    fn put_back_keeps_order() {
        let mut ix = Index::default();
        for id in 1..=3 {
            ix.insert(entry(id, &["a@x.test"]), 0);
        }
        let (_, first) = ix.take(0, None, |_, _| true).unwrap();
        ix.put_back("x.test", first.env.id, 0);
        assert_eq!(take_all(&mut ix, "x.test"), vec![1, 2, 3]);
    }

    #[test]
    fn deferred_message_waits_until_due() {
        let mut ix = Index::default();
        ix.insert(entry(1, &["a@x.test"]), 0);
        ix.insert(entry(2, &["a@x.test"]), 0);
        let (_, mut e) = ix.take(0, None, |_, _| true).unwrap();
        e.env.recipients[0].next_attempt = 500;
        ix.update(e.env.clone(), 0);
        ix.put_back("x.test", e.env.id, 0);
        assert_eq!(ix.take(100, None, |_, _| true).unwrap().1.env.id.0, 2);
        assert!(ix.take(100, None, |_, _| true).is_none());
        assert_eq!(ix.next_due(), Some(500));
        assert_eq!(ix.take(500, None, |_, _| true).unwrap().1.env.id.0, 1);
    }

    #[test]
    fn held_route_and_held_message_are_skipped() {
        let mut ix = Index::default();
        ix.insert(entry(1, &["a@x.test"]), 0);
        let mut held = entry(2, &["a@y.test"]);
        held.env.held = true;
        ix.insert(held, 0);
        ix.route_mut("x.test").route_held = true;
        assert!(ix.take(0, None, |_, _| true).is_none());
        ix.route_mut("x.test").route_held = false;
        assert_eq!(ix.take(0, None, |_, _| true).unwrap().1.env.id.0, 1);
    }

    #[test]
    fn can_take_limits_concurrency() {
        let mut ix = Index::default();
        for id in 1..=3 {
            ix.insert(entry(id, &["a@x.test"]), 0);
        }
        assert!(ix.take(0, None, |_, n| n < 1).is_some());
        assert!(ix.take(0, None, |_, n| n < 1).is_none());
    }

    #[test]
    fn claimed_message_is_not_taken_until_unclaimed() {
        let mut ix = Index::default();
        ix.insert(entry(1, &["a@x.test", "b@y.test"]), 0);
        assert!(ix.claim(QueueId(1)).is_some());
        assert!(ix.claim(QueueId(1)).is_none(), "already claimed");
        assert!(ix.take(0, None, |_, _| true).is_none());
        ix.unclaim(QueueId(1), 0);
        assert!(ix.take(0, None, |_, _| true).is_some());
        assert!(ix.claim(QueueId(1)).is_none(), "in flight on one route");
    }

    #[test]
    fn remove_clears_bytes_and_stats() {
        let mut ix = Index::default();
        ix.insert(entry(1, &["a@x.test", "b@y.test"]), 0);
        assert_eq!(ix.bytes(), 100);
        ix.remove(QueueId(1));
        assert_eq!(ix.bytes(), 0);
        assert!(ix.stats().is_empty());
    }
}
