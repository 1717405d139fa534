//! Maintenance windows of the primary: while one is open, replay is held (mail only queues),
//! whatever the probe says — a primary that is half up during an upgrade must not be fed.
//!
//! A window is one-off (`start` + `duration`) or recurring (`schedule`, a five-field cron
//! expression, in `timeZone` (IANA name, default UTC) + `duration`). Evaluation is pure: the
//! caller passes the clock and the windows as [`crate::validate`] parsed them, so nothing here
//! parses (or can fail on) the spec's strings.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;

/// The windows' state at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowState {
    /// The open window: its reason and when it closes.
    pub active: Option<(String, DateTime<Utc>)>,
    /// The next window to open: when and why.
    pub next: Option<(DateTime<Utc>, String)>,
    /// When the most recent window that is over closed (replay ramps up again from there).
    pub last_end: Option<DateTime<Utc>>,
}

impl WindowState {
    /// The next instant the state changes (a window opening or closing), for a requeue.
    pub fn next_change(&self) -> Option<DateTime<Utc>> {
        match (&self.active, &self.next) {
            (Some((_, end)), Some((start, _))) => Some(*end.min(start)),
            (Some((_, end)), None) => Some(*end),
            (None, Some((start, _))) => Some(*start),
            (None, None) => None,
        }
    }
}

/// When a window opens.
#[derive(Debug, Clone)]
pub enum When {
    /// Once, at this instant (`start`).
    Once(DateTime<Utc>),
    /// At each occurrence of the cron `schedule`, read in the time zone `timeZone`.
    Every(Box<Cron>, chrono_tz::Tz),
}

/// A `spec.maintenanceWindows` entry, parsed.
#[derive(Debug, Clone)]
pub struct Window {
    pub when: When,
    /// How long it stays open.
    pub duration: Duration,
    /// Shown in status and events.
    pub reason: String,
}

/// The state of `windows` at `now`.
pub fn evaluate(windows: &[Window], now: DateTime<Utc>) -> WindowState {
    let mut state = WindowState::default();
    for w in windows {
        let reason = &w.reason;
        let duration = chrono::Duration::from_std(w.duration).unwrap_or_default();
        let (last_start, next_start) = match &w.when {
            When::Once(start) => {
                if *start <= now {
                    (Some(*start), None)
                } else {
                    (None, Some(*start))
                }
            }
            When::Every(cron, tz) => {
                let local = tz.from_utc_datetime(&now.naive_utc());
                let prev = cron
                    .find_previous_occurrence(&local, true)
                    .ok()
                    .map(|t| t.with_timezone(&Utc));
                let next = cron
                    .find_next_occurrence(&local, false)
                    .ok()
                    .map(|t| t.with_timezone(&Utc));
                (prev, next)
            }
        };
        if let Some(start) = last_start {
            let end = start + duration;
            if now < end && state.active.as_ref().is_none_or(|(_, e)| end > *e) {
                state.active = Some((reason.clone(), end));
            }
            if end <= now && state.last_end.is_none_or(|e| end > e) {
                state.last_end = Some(end);
            }
        }
        if let Some(start) = next_start
            && state.next.as_ref().is_none_or(|(s, _)| start < *s)
        {
            state.next = Some((start, reason.clone()));
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn once(start: &str, hours: u64) -> Window {
        Window {
            when: When::Once(at(start)),
            duration: Duration::from_secs(hours * 3600),
            reason: "upgrade".into(),
        }
    }

    #[test]
    fn one_off_window_opens_and_closes() {
        let w = [once("2026-12-01T02:00:00Z", 2)];
        let before = evaluate(&w, at("2026-12-01T01:00:00Z"));
        assert_eq!(before.active, None);
        assert_eq!(
            before.next,
            Some((at("2026-12-01T02:00:00Z"), "upgrade".into()))
        );
        assert_eq!(before.next_change(), Some(at("2026-12-01T02:00:00Z")));
        let during = evaluate(&w, at("2026-12-01T03:00:00Z"));
        assert_eq!(
            during.active,
            Some(("upgrade".into(), at("2026-12-01T04:00:00Z")))
        );
        assert_eq!(during.last_end, None);
        let after = evaluate(&w, at("2026-12-01T04:00:00Z"));
        assert_eq!(after.active, None, "end is exclusive");
        assert_eq!(
            after.last_end,
            Some(at("2026-12-01T04:00:00Z")),
            "replay ramps from here"
        );
    }

    #[test]
    fn recurring_window_in_a_named_time_zone() {
        // Saturdays 02:00 in Berlin (CET = UTC+1 in December), for one hour
        let w = [Window {
            when: When::Every(
                Box::new("0 2 * * 6".parse().unwrap()),
                chrono_tz::Europe::Berlin,
            ),
            duration: Duration::from_secs(3600),
            reason: "maintenance window".into(),
        }];
        // Saturday 2026-12-05 01:30 UTC = 02:30 Berlin: inside
        let s = evaluate(&w, at("2026-12-05T01:30:00Z"));
        assert_eq!(
            s.active.as_ref().map(|a| a.1),
            Some(at("2026-12-05T02:00:00Z"))
        );
        // Friday: outside, next is Saturday 01:00 UTC
        let s = evaluate(&w, at("2026-12-04T12:00:00Z"));
        assert_eq!(s.active, None);
        assert_eq!(s.next.map(|n| n.0), Some(at("2026-12-05T01:00:00Z")));
    }
}
