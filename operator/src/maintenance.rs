//! Maintenance windows of the primary: while one is open, replay is held (mail only queues),
//! whatever the probe says — a primary that is half up during an upgrade must not be fed.
//!
//! A window is one-off (`start` + `duration`) or recurring (`schedule`, a five-field cron
//! expression, in `timeZone` (IANA name, default UTC) + `duration`). Evaluation is pure: the
//! caller passes the clock.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;

use crate::crd::MaintenanceWindow;

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

/// A window's parsed form.
#[derive(Debug, Clone)]
enum When {
    Once(DateTime<Utc>),
    Every(Box<Cron>, chrono_tz::Tz),
}

fn parse(w: &MaintenanceWindow) -> Result<(When, Duration, String), String> {
    let duration = crate::validate::duration("duration", &w.duration)?;
    let reason = w
        .reason
        .clone()
        .unwrap_or_else(|| "maintenance window".into());
    let when = match (&w.start, &w.schedule) {
        (Some(start), None) => When::Once(
            DateTime::parse_from_rfc3339(start)
                .map_err(|e| format!("start: {start:?} is not an RFC 3339 time: {e}"))?
                .with_timezone(&Utc),
        ),
        (None, Some(schedule)) => {
            let tz: chrono_tz::Tz = w
                .time_zone
                .as_deref()
                .unwrap_or("UTC")
                .parse()
                .map_err(|_| format!("timeZone: {:?} is not an IANA time zone", w.time_zone))?;
            let cron = Cron::from_str(schedule)
                .map_err(|e| format!("schedule: {schedule:?} is not a cron expression: {e}"))?;
            When::Every(Box::new(cron), tz)
        }
        _ => return Err("start: give either start or schedule (one of them)".into()),
    };
    Ok((when, duration, reason))
}

/// Checks a window (the spec validation).
pub fn check(w: &MaintenanceWindow) -> Result<(), String> {
    parse(w).map(|_| ())
}

/// The state of `windows` at `now` (windows that do not parse are ignored: validation refuses
/// them before they get here).
pub fn evaluate(windows: &[MaintenanceWindow], now: DateTime<Utc>) -> WindowState {
    let mut state = WindowState::default();
    for w in windows {
        let Ok((when, duration, reason)) = parse(w) else {
            continue;
        };
        let duration = chrono::Duration::from_std(duration).unwrap_or_default();
        let (last_start, next_start) = match &when {
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
            state.next = Some((start, reason));
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

    fn once(start: &str, duration: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            start: Some(start.into()),
            schedule: None,
            time_zone: None,
            duration: duration.into(),
            reason: Some("upgrade".into()),
        }
    }

    #[test]
    fn one_off_window_opens_and_closes() {
        let w = [once("2026-12-01T02:00:00Z", "2h")];
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
        let w = [MaintenanceWindow {
            start: None,
            schedule: Some("0 2 * * 6".into()),
            time_zone: Some("Europe/Berlin".into()),
            duration: "1h".into(),
            reason: None,
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

    #[test]
    fn bad_windows_are_explained() {
        let mut w = once("tomorrow", "2h");
        assert!(check(&w).unwrap_err().contains("RFC 3339"));
        w.start = None;
        assert!(check(&w).unwrap_err().contains("either start or schedule"));
        w.schedule = Some("every saturday".into());
        assert!(check(&w).unwrap_err().contains("cron"));
        w.schedule = Some("0 2 * * 6".into());
        w.time_zone = Some("Mars/Olympus".into());
        assert!(check(&w).unwrap_err().contains("time zone"));
    }
}
