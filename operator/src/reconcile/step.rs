//! What a step of the apply pass hands back besides its own result: the events it has to tell
//! and how soon it wants the object looked at again. The pass folds the steps' outcomes in the
//! order the steps ran ([`StepOutcome::fold`]): events are concatenated, the earliest requeue
//! wins; then it publishes the events and requeues.

use std::time::Duration;

use kube::runtime::events::EventType;

use super::{Context, publish};
use crate::crd::BackupMx;

/// One event to publish about the BackupMx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub message: String,
}

impl Note {
    /// A Warning event when `warning`, else a Normal one.
    pub fn new(warning: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub fn normal(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(false, reason, message)
    }

    pub fn warning(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(true, reason, message)
    }
}

/// The events and the requeue time of one step, or of the steps folded so far.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Events to publish, in the order they happened.
    pub events: Vec<Note>,
    /// Look again after this long (sooner than the resync); `None`: no wish.
    pub requeue: Option<Duration>,
}

impl StepOutcome {
    /// Just these events (none for `None`).
    pub fn events(events: impl IntoIterator<Item = Note>) -> Self {
        Self {
            events: events.into_iter().collect(),
            requeue: None,
        }
    }

    /// `next` after the steps folded so far: its events come after theirs, and the earliest
    /// requeue wins.
    pub fn fold(&mut self, next: StepOutcome) {
        self.events.extend(next.events);
        self.requeue = [self.requeue, next.requeue].into_iter().flatten().min();
    }

    /// Folds a step's outcome in and hands back the step's own result.
    pub fn take<T>(&mut self, (value, outcome): (T, StepOutcome)) -> T {
        self.fold(outcome);
        value
    }

    /// Publishes the events folded so far (and forgets them), in order.
    pub async fn publish(&mut self, ctx: &Context, bmx: &BackupMx) {
        for note in std::mem::take(&mut self.events) {
            publish(ctx, bmx, note.type_, &note.reason, note.message).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(events: &[&str], requeue: Option<u64>) -> StepOutcome {
        StepOutcome {
            events: events.iter().map(|r| Note::normal(*r, "")).collect(),
            requeue: requeue.map(Duration::from_secs),
        }
    }

    #[test]
    fn the_fold_keeps_the_events_in_step_order_and_the_earliest_requeue() {
        let mut pass = StepOutcome::default();
        for s in [
            step(&["NetworkPolicyDeleted"], None),
            step(&[], Some(30)),
            step(&["DNSUpdated", "DNSWarning"], Some(5)),
            step(&["PrimaryDown"], None),
            step(&[], Some(2)),
            step(&["DrillPassed"], Some(60)),
        ] {
            pass.fold(s);
        }
        let reasons: Vec<_> = pass.events.iter().map(|n| n.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "NetworkPolicyDeleted",
                "DNSUpdated",
                "DNSWarning",
                "PrimaryDown",
                "DrillPassed"
            ]
        );
        assert_eq!(pass.requeue, Some(Duration::from_secs(2)));
    }

    #[test]
    fn no_step_asking_to_requeue_leaves_the_resync_to_the_pass() {
        let mut pass = StepOutcome::default();
        let value = pass.take((7, step(&["ScaledDown"], None)));
        assert_eq!(value, 7);
        pass.fold(StepOutcome::default());
        assert_eq!(pass.requeue, None);
        assert_eq!(pass.events, [Note::normal("ScaledDown", "")]);
    }

    #[test]
    fn a_note_is_a_warning_only_when_asked() {
        assert_eq!(Note::new(true, "X", "m").type_, EventType::Warning);
        assert_eq!(Note::new(false, "X", "m").type_, EventType::Normal);
        assert_eq!(Note::warning("X", "m"), Note::new(true, "X", "m"));
    }
}
