//! Reconcile against a mocked API server: which calls each path makes, in which order, with
//! which bodies (the real API server tier is in `tests/tests/operator/`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use axum::{Json, Router, http::HeaderMap, routing::get, routing::post};
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::reconcile;
use crate::{
    crd::{BackupMx, DeletionPolicy},
    error::Error,
    fixtures::{BackupMxExt, Expect, backupmx},
    pod_admin::PodAdmin,
    reconcile::Context,
};

const NS: &str = "/api/v1/namespaces/mail";
const BMX: &str = "/apis/backupmx.io/v1alpha1/namespaces/mail/backupmxes/example";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/mail/events";

fn echo_event() -> Expect {
    Expect::new(Method::POST, EVENTS, |b| (StatusCode::CREATED, b.clone()))
}

const NETPOL: &str = "/apis/networking.k8s.io/v1/namespaces/mail/networkpolicies/example-mx-pod";

/// The calls of an apply pass up to the PodDisruptionBudget: the Secret (read, then applied),
/// ConfigMap, Services, the NetworkPolicy, the pods and the StatefulSet's current replicas (a
/// scale-down waits for a drain), the StatefulSet, the PDB.
fn apply_children(secret: Expect, ready: i64) -> Vec<Expect> {
    apply_children_with(secret, ready, vec![Expect::apply(NETPOL)])
}

/// [`apply_children`] with `netpol` as the NetworkPolicy's calls.
fn apply_children_with(secret: Expect, ready: i64, netpol: Vec<Expect>) -> Vec<Expect> {
    let mut calls = vec![
        secret,
        Expect::apply(format!("{NS}/secrets/example-admin-token")),
        Expect::apply(format!("{NS}/configmaps/example-config")),
        Expect::apply(format!("{NS}/services/example-pods")),
        Expect::apply(format!("{NS}/services/example-smtp")),
    ];
    calls.extend(netpol);
    calls.extend([
        no_pods(),
        Expect::not_found(
            Method::GET,
            "/apis/apps/v1/namespaces/mail/statefulsets/example",
        ),
        Expect::new(
            Method::PATCH,
            "/apis/apps/v1/namespaces/mail/statefulsets/example",
            move |b| {
                let mut sts = b.clone();
                sts["status"] = json!({"replicas": 2, "readyReplicas": ready});
                (StatusCode::OK, sts)
            },
        ),
        Expect::apply("/apis/policy/v1/namespaces/mail/poddisruptionbudgets/example"),
    ]);
    calls
}

/// A JSON patch of the BackupMx (finalizer added or removed), answered with the object.
fn object_patch() -> Expect {
    Expect::new(Method::PATCH, BMX, |_| {
        (StatusCode::OK, serde_json::to_value(backupmx()).unwrap())
    })
}

/// A status apply, answered with the object carrying that status.
fn status_patch() -> Expect {
    Expect::new(Method::PATCH, format!("{BMX}/status"), |b| {
        let mut obj = serde_json::to_value(backupmx()).unwrap();
        obj["status"] = b["status"].clone();
        (StatusCode::OK, obj)
    })
}

fn no_pods() -> Expect {
    Expect::new(Method::GET, format!("{NS}/pods"), |_| {
        (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
        )
    })
}

fn body_of<'a>(seen: &'a [(String, Value)], call: &str) -> &'a Value {
    &seen
        .iter()
        .find(|(c, _)| c == call)
        .unwrap_or_else(|| panic!("no call {call}"))
        .1
}

async fn run(
    bmx: BackupMx,
    expects: Vec<Expect>,
    pods: PodAdmin,
) -> (Result<Action, Error>, Vec<(String, Value)>) {
    let (ctx, server) = Context::test(pods);
    let verifier = server.run(expects);
    let result = reconcile(Arc::new(bmx), ctx.clone()).await;
    drop(ctx); // closes the mock: a missing call shows as a timeout in the verifier
    let seen = verifier.await.expect("scenario completed");
    (result, seen)
}

#[tokio::test]
async fn a_new_object_gets_the_finalizer_first() {
    let (result, seen) = run(backupmx(), vec![object_patch()], PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");
    let patch = seen[0].1.to_string();
    assert!(patch.contains("backupmx.io/cleanup"), "{patch}");
}

#[tokio::test]
async fn create_applies_every_child_then_reports_status() {
    let mut expects = apply_children(
        Expect::not_found(Method::GET, format!("{NS}/secrets/example-admin-token")),
        0,
    );
    expects.extend([echo_event(), status_patch()]);
    let (result, seen) = run(backupmx().finalized(), expects, PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");

    let secret = body_of(&seen, &format!("PATCH {NS}/secrets/example-admin-token"));
    assert_eq!(secret["data"]["token"].as_str().unwrap().len(), 88); // base64 of 64 hex chars
    let cm = body_of(&seen, &format!("PATCH {NS}/configmaps/example-config"));
    let toml = cm["data"]["mx-pod.toml"].as_str().unwrap();
    let config = mx_pod::config::Config::parse(toml, "configmap").unwrap();
    assert_eq!(config.domains.len(), 2);
    let sts = body_of(
        &seen,
        "PATCH /apis/apps/v1/namespaces/mail/statefulsets/example",
    );
    assert_eq!(sts["metadata"]["ownerReferences"][0]["controller"], true);
    // the NetworkPolicy is applied before the StatefulSet (its pods start fenced), admitting
    // the operator's namespace (Context::test: backupmx-system) to the admin port
    let position = |call: &str| seen.iter().position(|(c, _)| c == call).unwrap();
    assert!(
        position(&format!("PATCH {NETPOL}"))
            < position("PATCH /apis/apps/v1/namespaces/mail/statefulsets/example")
    );
    let netpol = body_of(&seen, &format!("PATCH {NETPOL}"));
    assert_eq!(netpol["kind"], "NetworkPolicy");
    assert_eq!(netpol["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(
        netpol["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "backupmx-system"
    );
    let status = body_of(&seen, &format!("PATCH {BMX}/status"));
    assert_eq!(status["status"]["observedGeneration"], 1);
    let ready = &status["status"]["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str()),
        (Some("Ready"), Some("False"))
    );
    assert_eq!(ready["reason"], "PodsNotReady");
    let event = body_of(&seen, &format!("POST {EVENTS}"));
    assert_eq!(event["reason"], "PodsNotReady");
}

#[tokio::test]
async fn a_settled_object_keeps_its_token_and_writes_no_status() {
    // first pass: everything ready; capture the status it writes
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "example-admin-token", "namespace": "mail"},
        "data": {"token": "c2VjcmV0LXRva2Vu"}});
    let get_secret = |s: Value| {
        Expect::new(
            Method::GET,
            format!("{NS}/secrets/example-admin-token"),
            move |_| (StatusCode::OK, s),
        )
    };
    let mut expects = apply_children(get_secret(secret.clone()), 2);
    expects.extend([echo_event(), status_patch()]);
    let (result, seen) = run(backupmx().finalized(), expects, PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");
    let applied = body_of(&seen, &format!("PATCH {NS}/secrets/example-admin-token"));
    assert_eq!(
        applied["data"]["token"], "c2VjcmV0LXRva2Vu",
        "the token is kept"
    );
    let status = body_of(&seen, &format!("PATCH {BMX}/status"))["status"].clone();
    assert_eq!(status["conditions"][0]["reason"], "AllPodsReady");

    // second pass on the object carrying that status: children re-applied, no event, no status
    let mut bmx = backupmx().finalized();
    bmx.status = Some(serde_json::from_value(status).unwrap());
    let expects = apply_children(get_secret(secret), 2);
    let (result, seen) = run(bmx, expects, PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(seen.len(), 10);
}

/// A NetworkPolicy as the API server returns it, controlled by `owner_uid`.
fn existing_netpol(owner_uid: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "example-mx-pod", "namespace": "mail", "uid": "np-uid-1",
            "ownerReferences": [{"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
                "name": "example", "uid": owner_uid, "controller": true}]},
        "spec": {"podSelector": {}}})
}

/// The NetworkPolicy's calls when `spec.networkPolicy.enabled` is false and the operator made
/// it: read, then deleted.
fn delete_own_netpol() -> Vec<Expect> {
    let uid = backupmx().metadata.uid.unwrap();
    vec![
        Expect::new(Method::GET, NETPOL, move |_| {
            (StatusCode::OK, existing_netpol(&uid))
        }),
        Expect::new(Method::DELETE, NETPOL, |_| {
            (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
        }),
    ]
}

#[tokio::test]
async fn disabling_the_network_policy_deletes_the_one_it_made() {
    let mut expects = apply_children_with(
        Expect::not_found(Method::GET, format!("{NS}/secrets/example-admin-token")),
        0,
        delete_own_netpol(),
    );
    // the pass publishes its steps' events at the end, in step order: NetworkPolicyDeleted
    // (objects), then PodsNotReady (status)
    expects.extend([echo_event(), echo_event(), status_patch()]);
    let bmx = backupmx()
        .finalized()
        .with_spec(|s| s.network_policy.enabled = false);
    let (result, seen) = run(bmx, expects, PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");
    let delete = body_of(&seen, &format!("DELETE {NETPOL}"));
    assert_eq!(
        delete["preconditions"]["uid"], "np-uid-1",
        "only the object it read is deleted"
    );
    let deleted = seen
        .iter()
        .find(|(c, b)| c == &format!("POST {EVENTS}") && b["reason"] == "NetworkPolicyDeleted")
        .expect("an event says the policy was deleted");
    assert_eq!(deleted.1["type"], "Normal");
}

#[tokio::test]
async fn a_failed_step_still_publishes_the_events_of_the_steps_before_it() {
    let mut expects = apply_children_with(
        Expect::not_found(Method::GET, format!("{NS}/secrets/example-admin-token")),
        0,
        delete_own_netpol(),
    );
    // the StatefulSet apply fails: no PodDisruptionBudget, no status
    expects.truncate(expects.len() - 2);
    expects.extend([
        Expect::new(
            Method::PATCH,
            "/apis/apps/v1/namespaces/mail/statefulsets/example",
            |_| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "InternalError", "code": 500, "message": "etcd is away"}),
                )
            },
        ),
        echo_event(),
    ]);
    let bmx = backupmx()
        .finalized()
        .with_spec(|s| s.network_policy.enabled = false);
    let (result, seen) = run(bmx, expects, PodAdmin::default()).await;
    let err = result.unwrap_err();
    assert!(err.to_string().contains("StatefulSet"), "{err}");
    let (call, event) = seen.last().unwrap();
    assert_eq!(call, &format!("POST {EVENTS}"));
    assert_eq!(event["reason"], "NetworkPolicyDeleted");
}

#[tokio::test]
async fn disabling_leaves_a_network_policy_it_did_not_make_and_none_is_no_call() {
    // someone else's object of that name: read, not deleted
    let netpol = vec![Expect::new(Method::GET, NETPOL, |_| {
        (StatusCode::OK, existing_netpol("another-owner"))
    })];
    let mut expects = apply_children_with(
        Expect::not_found(Method::GET, format!("{NS}/secrets/example-admin-token")),
        0,
        netpol,
    );
    expects.extend([echo_event(), status_patch()]);
    let bmx = || {
        backupmx()
            .finalized()
            .with_spec(|s| s.network_policy.enabled = false)
    };
    // the scenario lists every call: a DELETE would fail it
    let (result, _) = run(bmx(), expects, PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");

    // none there: one read, nothing else
    let mut expects = apply_children_with(
        Expect::not_found(Method::GET, format!("{NS}/secrets/example-admin-token")),
        0,
        vec![Expect::not_found(Method::GET, NETPOL)],
    );
    expects.extend([echo_event(), status_patch()]);
    let (result, _) = run(bmx(), expects, PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_says_why() {
    let bmx = backupmx().finalized().with_spec(|s| {
        s.retention = "1h".into();
        s.delay_warning = "4h".into();
    });
    let (result, seen) = run(bmx, vec![echo_event(), status_patch()], PodAdmin::default()).await;
    assert_eq!(result.unwrap(), Action::await_change());
    let event = &seen[0].1;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidSpec");
    let ready = &seen[1].1["status"]["conditions"][0];
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.delayWarning"),
        "{ready}"
    );
}

#[tokio::test]
async fn orphan_deletion_removes_the_finalizer_at_once() {
    let bmx = backupmx()
        .finalized()
        .deleting()
        .with_spec(|s| s.deletion_policy = DeletionPolicy::Orphan);
    let (result, seen) = run(bmx, vec![echo_event(), object_patch()], PodAdmin::default()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(seen[0].1["reason"], "Orphaned");
    assert!(seen[1].1.to_string().contains("remove"), "{}", seen[1].1);
}

/// A stand-in for one mx-pod's admin API: holds `queued` messages until told to drain.
async fn fake_pod(queued: Arc<AtomicUsize>, drained: Arc<AtomicBool>) -> SocketAddr {
    let app = Router::new()
        .route(
            "/v1/queue",
            get({
                let (queued, drained) = (queued.clone(), drained.clone());
                move || async move {
                    let n = queued.load(Ordering::SeqCst);
                    Json(
                        json!({"messages": n, "bytes": n * 1000, "disk_bytes": 0, "held": false,
                        "draining": drained.load(Ordering::SeqCst),
                        "domains": [{"domain": "example.com", "messages": n, "bytes": n * 1000,
                                     "oldest_age_seconds": 60, "held": false}]}),
                    )
                }
            }),
        )
        .route(
            "/v1/drain",
            post(move |headers: HeaderMap| async move {
                assert_eq!(headers["authorization"], "Bearer secret-token");
                drained.store(true, Ordering::SeqCst);
                Json(json!({"draining": true}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn deletion_drains_and_waits_while_a_pod_holds_mail() {
    let queued = Arc::new(AtomicUsize::new(3));
    let drained = Arc::new(AtomicBool::new(false));
    let addr = fake_pod(queued.clone(), drained.clone()).await;
    let pods = || {
        Expect::new(Method::GET, format!("{NS}/pods"), |_| {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": [{"metadata": {"name": "example-0", "namespace": "mail"},
                           "status": {"phase": "Running", "podIP": "127.0.0.1"}}]}),
            )
        })
    };
    let secret = || {
        Expect::new(
            Method::GET,
            format!("{NS}/secrets/example-admin-token"),
            |_| {
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "example-admin-token"},
                "data": {"token": "c2VjcmV0LXRva2Vu"}}),
                )
            },
        )
    };
    let bmx = backupmx().finalized().deleting();
    let (result, seen) = run(
        bmx.clone(),
        vec![pods(), secret(), echo_event(), status_patch()],
        PodAdmin::new(addr.port()),
    )
    .await;
    assert!(drained.load(Ordering::SeqCst), "the pod was told to drain");
    let err = result.unwrap_err();
    assert_eq!(
        err.kind(),
        crate::error::ErrorKind::WaitingForDelivery,
        "{err}"
    );
    assert_eq!(seen[2].1["reason"], "WaitingForDelivery");
    let deleting = &seen[3].1["status"]["conditions"][0];
    assert_eq!(deleting["type"], "Deleting");
    assert!(
        deleting["message"]
            .as_str()
            .unwrap()
            .contains("example-0: 3"),
        "{deleting}"
    );

    // delivered: the next pass lets deletion finish
    queued.store(0, Ordering::SeqCst);
    let (result, seen) = run(
        bmx,
        vec![pods(), secret(), echo_event(), object_patch()],
        PodAdmin::new(addr.port()),
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(seen[2].1["reason"], "Drained");
}
