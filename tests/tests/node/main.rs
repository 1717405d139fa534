//! Issue 8: the operator drives replay with its StatefulSet's pods run by a REAL kubelet
//! (containerd, runc, the CNI bridge) from the `backupmx/mx-pod:VERSION` image, their queues on
//! PersistentVolumes, and the operator running outside the cluster as a process that reaches
//! the pods on their pod IPs. The real-node twins of `tests/operator/replay.rs` (where the test
//! plays the kubelet): outage and ramp, maintenance window, cutover, scale-down drain, webhook
//! alerts, failover drill. Issue 9's disaster scenarios (pods deleted and killed under load,
//! a rolling update, the leader killed, rspamd during an outage, a full volume, deletion with
//! DNS, spec errors) are in [`disaster`].
//!
//! The primaries are real Postfix instances listening on the node's gateway address (where pods
//! reach the host); mail is sent to the pods' IPs on port 2525. The control plane and the node
//! are started once for this test binary (`backupmx_tests::node::node`) and stopped, with the
//! host's state restored, when it exits.

use backupmx_tests::{
    node::NodeTier,
    scenarios::{self},
};

mod disaster;

/// (a) An outage, a crash of the container (`kill -9` from the host) and the ramp after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_holds_replay_then_recovery_ramps_up_and_delivers_in_order() {
    scenarios::outage(&NodeTier).await
}

/// (b) A maintenance window opening on its cron schedule holds replay though the primary is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_holds_replay_though_the_primary_is_up() {
    scenarios::maintenance_window(&NodeTier).await
}

/// (c) Cutover: the StatefulSet rolls the pod (the kubelet replaces it, the volume stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_sends_queued_mail_to_the_new_primary_only() {
    scenarios::cutover(&NodeTier).await
}

/// (d) Scale 3 -> 2: pod 2 drains first, the kubelet stops it, its claim stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_the_removed_pod_first_and_loses_nothing() {
    scenarios::scale_down(&NodeTier).await
}

/// (e) Alerts to a webhook and by email, once per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_webhook_once_per_change() {
    scenarios::alerts(&NodeTier).await
}

/// (f) The failover drill, passing and failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_passes_with_a_healthy_primary_and_fails_with_a_dead_one() {
    scenarios::drill(&NodeTier).await
}
