//! How many replay workers each pod runs: the operator's decision, from the primary's health,
//! `spec.replay.paused`, the maintenance windows, the ramp-up, and what the pods report.
//!
//! | state | workers | reason |
//! |---|---|---|
//! | `spec.replay.paused` | 0 | `Paused` |
//! | inside a maintenance window | 0 | `MaintenanceWindow` |
//! | primary down, not yet probed, or just changed (cutover) | 0 | `PrimaryDown` |
//! | healthy (and out of any window) for less than `rampUp` | 1 … `maxWorkers`, linearly | `RampingUp` |
//! | a pod reports `421`/`4xx` backoff from the primary | half of the above (at least 1) | `Backoff` |
//! | healthy (and out of any window) for `rampUp` and more | `maxWorkers` | `Full` |
//!
//! The ramp counts from the latest of: when the primary became healthy, the end of the last
//! maintenance window, and when `spec.replay.paused` was lifted. A primary back from an upgrade
//! is not flooded, whether the hold was a window or a pause.
//!
//! Pods whose configuration is not the current one (a rolling update in progress, e.g. after a
//! change of primary) get 0 whatever the decision: they may still name the old primary.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{health::Health, maintenance::WindowState};

/// What the operator decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub workers: u32,
    pub reason: ReplayReason,
    pub message: String,
}

/// Why replay runs with the workers it has: `status.replay.reason`, in PascalCase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayReason {
    /// `spec.replay.paused`.
    Paused,
    MaintenanceWindow,
    /// Down, or not confirmed healthy yet.
    PrimaryDown,
    /// Healthy for less than `spec.replay.rampUp`: workers grow step by step.
    RampingUp,
    /// The primary pushes back (`421`, `4xx`): half the workers.
    Backoff,
    Full,
}

impl ReplayReason {
    /// The word in `status.replay.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayReason::Paused => "Paused",
            ReplayReason::MaintenanceWindow => "MaintenanceWindow",
            ReplayReason::PrimaryDown => "PrimaryDown",
            ReplayReason::RampingUp => "RampingUp",
            ReplayReason::Backoff => "Backoff",
            ReplayReason::Full => "Full",
        }
    }
}

impl std::fmt::Display for ReplayReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The facts the decision is made from.
pub struct Inputs<'a> {
    pub paused: bool,
    pub window: &'a WindowState,
    /// The prober's view; `None` before the first probe.
    pub health: Option<&'a Health>,
    /// `host:port` the spec names now (a health report about another target is stale).
    pub target: &'a str,
    pub now: DateTime<Utc>,
    pub ramp_up: Duration,
    pub max_workers: u32,
    /// Some pod reports the primary pushing back (`421`, `4xx`).
    pub backoff: bool,
    /// When `spec.replay.paused` was last lifted ([`resumed_at`]).
    pub resumed_at: Option<DateTime<Utc>>,
}

/// When `spec.replay.paused` was last lifted: now, when the last decision was `Paused` and the
/// spec no longer pauses; else what the status recorded before.
pub fn resumed_at(
    paused: bool,
    last_reason: Option<&str>,
    recorded: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if !paused && last_reason == Some(ReplayReason::Paused.as_str()) {
        Some(now)
    } else {
        recorded
    }
}

/// Decides the workers per pod.
pub fn decide(i: &Inputs<'_>) -> Decision {
    if i.paused {
        return Decision {
            workers: 0,
            reason: ReplayReason::Paused,
            message: "spec.replay.paused is true: mail is queued, not delivered".into(),
        };
    }
    if let Some((reason, end)) = &i.window.active {
        return Decision {
            workers: 0,
            reason: ReplayReason::MaintenanceWindow,
            message: format!(
                "inside a maintenance window ({reason}) until {}",
                end.to_rfc3339()
            ),
        };
    }
    let health = i.health.filter(|h| h.target == i.target);
    let since = match health {
        Some(Health {
            healthy: Some(true),
            since: Some(since),
            ..
        }) => *since,
        Some(h) if h.healthy == Some(false) => {
            return Decision {
                workers: 0,
                reason: ReplayReason::PrimaryDown,
                message: format!(
                    "primary {} is down: {}",
                    i.target,
                    h.last_error.as_deref().unwrap_or("no answer")
                ),
            };
        }
        _ => {
            return Decision {
                workers: 0,
                reason: ReplayReason::PrimaryDown,
                message: format!("primary {} not confirmed healthy yet", i.target),
            };
        }
    };
    let since = [i.window.last_end, i.resumed_at]
        .into_iter()
        .flatten()
        .fold(since, DateTime::max);
    let max = i.max_workers.max(1);
    let healthy_for = (i.now - since).to_std().unwrap_or_default();
    let ramped = if i.ramp_up.is_zero() || healthy_for >= i.ramp_up {
        max
    } else {
        let share = healthy_for.as_secs_f64() / i.ramp_up.as_secs_f64();
        (1 + ((max - 1) as f64 * share).floor() as u32).min(max)
    };
    if i.backoff {
        let w = (ramped / 2).max(1);
        return Decision {
            workers: w,
            reason: ReplayReason::Backoff,
            message: format!("the primary pushes back (421/4xx): {w} of {max} workers"),
        };
    }
    if ramped < max {
        Decision {
            workers: ramped,
            reason: ReplayReason::RampingUp,
            message: format!(
                "primary healthy (and out of any maintenance window) for {}s: {ramped} of {max} workers, full after {}s",
                healthy_for.as_secs(),
                i.ramp_up.as_secs()
            ),
        }
    } else {
        Decision {
            workers: max,
            reason: ReplayReason::Full,
            message: format!("primary healthy: all {max} workers"),
        }
    }
}

/// When the decision changes next by itself (ramp steps, a window boundary), for a requeue.
pub fn next_change(i: &Inputs<'_>, d: &Decision) -> Option<Duration> {
    let window = i
        .window
        .next_change()
        .and_then(|t| (t - i.now).to_std().ok());
    let ramp = matches!(d.reason, ReplayReason::RampingUp | ReplayReason::Backoff).then(|| {
        // one step of the ramp, at least a second
        (i.ramp_up / i.max_workers.max(1)).max(Duration::from_secs(1))
    });
    match (window, ramp) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn healthy(since: &str) -> Health {
        Health {
            target: "mail.example.com:25".into(),
            healthy: Some(true),
            since: Some(at(since)),
            ..Default::default()
        }
    }

    fn inputs<'a>(health: Option<&'a Health>, window: &'a WindowState, now: &str) -> Inputs<'a> {
        Inputs {
            paused: false,
            window,
            health,
            target: "mail.example.com:25",
            now: at(now),
            ramp_up: Duration::from_secs(120),
            max_workers: 8,
            backoff: false,
            resumed_at: None,
        }
    }

    #[test]
    fn down_unknown_paused_and_windows_hold_everything() {
        let w = WindowState::default();
        assert_eq!(
            decide(&inputs(None, &w, "2026-12-01T00:00:00Z")).reason,
            ReplayReason::PrimaryDown
        );
        let down = Health {
            target: "mail.example.com:25".into(),
            healthy: Some(false),
            last_error: Some("connection refused".into()),
            ..Default::default()
        };
        let d = decide(&inputs(Some(&down), &w, "2026-12-01T00:00:00Z"));
        assert_eq!((d.workers, d.reason), (0, ReplayReason::PrimaryDown));
        assert!(d.message.contains("connection refused"));

        let up = healthy("2026-11-30T00:00:00Z");
        let mut i = inputs(Some(&up), &w, "2026-12-01T00:00:00Z");
        i.paused = true;
        assert_eq!(decide(&i).reason, ReplayReason::Paused);
        let open = WindowState {
            active: Some(("upgrade".into(), at("2026-12-01T02:00:00Z"))),
            next: None,
            last_end: None,
        };
        let d = decide(&inputs(Some(&up), &open, "2026-12-01T00:00:00Z"));
        assert_eq!((d.workers, d.reason), (0, ReplayReason::MaintenanceWindow));
    }

    #[test]
    fn health_of_another_target_is_not_trusted_after_a_cutover() {
        let w = WindowState::default();
        let mut old = healthy("2026-11-30T00:00:00Z");
        old.target = "old.example.com:25".into();
        assert_eq!(
            decide(&inputs(Some(&old), &w, "2026-12-01T00:00:00Z")).workers,
            0
        );
    }

    #[test]
    fn ramp_goes_from_one_to_max_over_ramp_up_and_backoff_halves() {
        let w = WindowState::default();
        let up = healthy("2026-12-01T00:00:00Z");
        let at_s = |s: u32| {
            decide(&inputs(
                Some(&up),
                &w,
                &format!("2026-12-01T00:{:02}:{:02}Z", s / 60, s % 60),
            ))
        };
        assert_eq!(
            (at_s(0).workers, at_s(0).reason),
            (1, ReplayReason::RampingUp)
        );
        assert_eq!(at_s(60).workers, 4);
        assert_eq!(
            (at_s(120).workers, at_s(120).reason),
            (8, ReplayReason::Full)
        );
        let mut i = inputs(Some(&up), &w, "2026-12-01T00:05:00Z");
        i.backoff = true;
        let d = decide(&i);
        assert_eq!((d.workers, d.reason), (4, ReplayReason::Backoff));
        assert_eq!(next_change(&i, &d), Some(Duration::from_secs(15)));
    }

    #[test]
    fn replay_ramps_up_again_after_a_maintenance_window() {
        // healthy for a day; the window closed 30 s ago: 30/120 of the ramp, not Full
        let up = healthy("2026-11-30T00:00:00Z");
        let closed = WindowState {
            active: None,
            next: None,
            last_end: Some(at("2026-12-01T00:00:00Z")),
        };
        let d = decide(&inputs(Some(&up), &closed, "2026-12-01T00:00:30Z"));
        assert_eq!((d.workers, d.reason), (2, ReplayReason::RampingUp));
        let d = decide(&inputs(Some(&up), &closed, "2026-12-01T00:02:00Z"));
        assert_eq!((d.workers, d.reason), (8, ReplayReason::Full));
        // a window long ago changes nothing; a primary healthy only since after it counts
        let old = WindowState {
            last_end: Some(at("2026-11-01T00:00:00Z")),
            ..closed
        };
        let d = decide(&inputs(Some(&up), &old, "2026-12-01T00:00:30Z"));
        assert_eq!(d.reason, ReplayReason::Full);
        let recent = healthy("2026-12-01T00:00:00Z");
        let d = decide(&inputs(Some(&recent), &old, "2026-12-01T00:00:00Z"));
        assert_eq!((d.workers, d.reason), (1, ReplayReason::RampingUp));
    }

    #[test]
    fn replay_ramps_up_again_when_the_pause_is_lifted() {
        let w = WindowState::default();
        let up = healthy("2026-11-30T00:00:00Z");
        let now = at("2026-12-01T00:00:00Z");
        // lifted now: recorded, and the ramp starts at 1
        let lifted = resumed_at(false, Some("Paused"), None, now);
        assert_eq!(lifted, Some(now));
        let mut i = inputs(Some(&up), &w, "2026-12-01T00:00:30Z");
        i.resumed_at = lifted;
        assert_eq!(decide(&i).workers, 2, "30 s of a 120 s ramp");
        i.now = at("2026-12-01T00:02:00Z");
        assert_eq!(decide(&i).reason, ReplayReason::Full);
        // later decisions keep the recorded time; a pause in force records nothing new
        let later = at("2026-12-01T00:05:00Z");
        assert_eq!(resumed_at(false, Some("Full"), lifted, later), lifted);
        assert_eq!(resumed_at(true, Some("Paused"), lifted, later), lifted);
        assert_eq!(resumed_at(false, None, None, later), None);
    }
}
