//! `kubectl apply` of the CRD and the example BackupMx: the operator creates every owned object
//! as specified, a second reconcile changes nothing, and a spec edit is followed.

use std::time::Duration;

use backupmx_tests::{
    kube::{EXAMPLE_OBJECTS, Operator, cluster, condition, eventually, resource_versions},
    repo,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_becomes_owned_objects_and_a_second_pass_changes_nothing() {
    let cluster = cluster();
    let ns = cluster.namespace("reconcile").await;
    let operator = Operator::start(
        cluster,
        "op-reconcile",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    // the example as a user applies it, with the primary on loopback: the operator probes it,
    // and tests talk to 127.0.0.0/8 only
    let example = std::fs::read_to_string(repo().join("examples/backupmx.yaml"))
        .unwrap()
        .replace("host: mail.example.com", "host: 127.0.0.1\n    port: 9");
    assert!(
        example.contains("host: 127.0.0.1"),
        "the example names its primary"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backupmx.yaml");
    std::fs::write(&file, example).unwrap();
    cluster.kubectl_ok(&["-n", &ns, "apply", "-f", &file.to_string_lossy()]);

    let bmx = eventually(
        "status with observedGeneration 1",
        Duration::from_secs(60),
        || async {
            cluster
                .get(&ns, "bmx/example")
                .filter(|b| b["status"]["observedGeneration"] == 1)
        },
    )
    .await;
    let uid = bmx["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(bmx["metadata"]["finalizers"][0], "backupmx.io/cleanup");
    let (ready, reason, _) = condition(&bmx, "Ready").expect("Ready condition");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "PodsNotReady"),
        "no kubelet: pods stay pending"
    );
    let ready_cond = bmx["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready_cond["observedGeneration"], 1);
    assert!(
        ready_cond["lastTransitionTime"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    let owned_by_it = |obj: &Value| {
        let refs = obj["metadata"]["ownerReferences"]
            .as_array()
            .expect("owner references");
        refs.iter()
            .any(|r| r["uid"] == uid.as_str() && r["kind"] == "BackupMx" && r["controller"] == true)
    };

    // StatefulSet
    let sts = cluster
        .get(&ns, "statefulset/example")
        .expect("StatefulSet");
    assert!(owned_by_it(&sts));
    let spec = &sts["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["serviceName"], "example-pods");
    assert_eq!(
        spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "1Gi"
    );
    assert!(
        spec.get("persistentVolumeClaimRetentionPolicy").is_none(),
        "not served on 1.20"
    );
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "backupmx/mx-pod:test");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 60);
    assert_eq!(
        pod["topologySpreadConstraints"].as_array().unwrap().len(),
        2
    );
    let hash1 = spec["template"]["metadata"]["annotations"]["backupmx.io/config-hash"]
        .as_str()
        .unwrap()
        .to_string();

    // Services
    let smtp = cluster
        .get(&ns, "service/example-smtp")
        .expect("smtp Service");
    assert!(owned_by_it(&smtp));
    assert_eq!(smtp["spec"]["type"], "LoadBalancer");
    assert_eq!(smtp["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(smtp["spec"]["ports"][0]["port"], 25);
    assert_eq!(smtp["spec"]["ports"][0]["protocol"], "TCP");
    let headless = cluster
        .get(&ns, "service/example-pods")
        .expect("headless Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");

    // ConfigMap: the TOML is a config mx-pod accepts
    let cm = cluster
        .get(&ns, "configmap/example-config")
        .expect("ConfigMap");
    assert!(owned_by_it(&cm));
    let toml = cm["data"]["mx-pod.toml"].as_str().unwrap();
    let config = mx_pod::config::Config::parse(toml, "ConfigMap").expect("mx-pod accepts it");
    assert_eq!(config.hostname, "mx2.example.com");
    assert_eq!(config.domains[0].name, "example.com");
    assert_eq!(config.domains[0].primary, "127.0.0.1:9");
    assert_eq!(config.queue.retention.to_string(), "5days");

    // Secret with a token
    let secret = cluster
        .get(&ns, "secret/example-admin-token")
        .expect("Secret");
    assert!(owned_by_it(&secret));
    let token = secret["data"]["token"].as_str().unwrap().to_string();
    assert!(token.len() > 40);

    // NetworkPolicy (its content: network_policy.rs)
    let netpol = cluster
        .get(&ns, "networkpolicy/example-mx-pod")
        .expect("NetworkPolicy");
    assert!(owned_by_it(&netpol));

    // PodDisruptionBudget: discovery chose policy/v1beta1 on this 1.20 server
    let pdb = cluster
        .get(&ns, "poddisruptionbudgets.v1beta1.policy/example")
        .expect("PDB");
    assert!(owned_by_it(&pdb));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // the operator's endpoint and logs
    let (code, _) = operator.get("/healthz").await.expect("operator HTTP");
    assert_eq!(code, 200);
    let log = operator.log_text();
    let reconcile_line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["span"]["name"] == "reconcile")
        .unwrap_or_else(|| panic!("no JSON log line inside a reconcile span:\n{log}"));
    assert_eq!(reconcile_line["span"]["namespace"], ns.as_str());
    assert_eq!(reconcile_line["span"]["name"], "reconcile");

    // idempotence: another pass (an annotation triggers one) changes no resourceVersion
    let objects: Vec<&str> = EXAMPLE_OBJECTS.into_iter().chain(["bmx/example"]).collect();
    // the StatefulSet controller writes the StatefulSet's status once it has made the pods
    eventually(
        "the StatefulSet controller to settle",
        Duration::from_secs(30),
        || async {
            cluster.get(&ns, "statefulset/example").filter(|s| {
                s["status"]["observedGeneration"] == s["metadata"]["generation"]
                    && s["status"]["replicas"] == 2
            })
        },
    )
    .await;
    let before = resource_versions(cluster, &ns, &objects);
    operator.another_pass(cluster, &ns, "example").await;
    let mut after = resource_versions(cluster, &ns, &objects);
    // the annotation itself bumped the BackupMx once; compare it against that
    let annotated_rv = after.remove("bmx/example").unwrap();
    let mut before = before;
    before.remove("bmx/example");
    assert_eq!(before, after, "a second reconcile changed owned objects");
    let bmx_now = cluster.get(&ns, "bmx/example").unwrap();
    assert_eq!(
        bmx_now["metadata"]["resourceVersion"],
        annotated_rv.as_str(),
        "status rewritten"
    );

    // a spec edit is followed: replicas, config (and so the pod template hash), observedGeneration
    cluster.patch(
        &ns,
        "bmx/example",
        &json!({"spec":{"replicas":3,"retention":"3d","replay":{"paused":true}}}),
    );
    let bmx = eventually("observedGeneration 2", Duration::from_secs(60), || async {
        cluster
            .get(&ns, "bmx/example")
            .filter(|b| b["status"]["observedGeneration"] == 2)
    })
    .await;
    assert_eq!(bmx["status"]["replay"]["workers"], 0);
    assert_eq!(bmx["status"]["replay"]["reason"], "Paused");
    let sts = cluster.get(&ns, "statefulset/example").unwrap();
    assert_eq!(sts["spec"]["replicas"], 3);
    let hash2 = sts["spec"]["template"]["metadata"]["annotations"]["backupmx.io/config-hash"]
        .as_str()
        .unwrap();
    assert_ne!(hash1, hash2, "a config change rolls the pods");
    let cm = cluster.get(&ns, "configmap/example-config").unwrap();
    let config =
        mx_pod::config::Config::parse(cm["data"]["mx-pod.toml"].as_str().unwrap(), "cm").unwrap();
    assert_eq!(config.queue.retention.to_string(), "3days");
    assert_eq!(config.replay.workers, 0);
    let secret = cluster.get(&ns, "secret/example-admin-token").unwrap();
    assert_eq!(
        secret["data"]["token"].as_str().unwrap(),
        token,
        "the token is kept"
    );

    // a deleted child comes back (the controller owns it)
    cluster.kubectl_ok(&["-n", &ns, "delete", "configmap/example-config"]);
    eventually(
        "the ConfigMap to be re-created",
        Duration::from_secs(30),
        || async { cluster.get(&ns, "configmap/example-config") },
    )
    .await;

    // `kubectl get bmx` shows the printer columns
    let table = cluster.kubectl_ok(&["-n", &ns, "get", "bmx"]);
    for col in ["DOMAINS", "PRIMARY", "READY", "QUEUED", "WORKERS"] {
        assert!(table.contains(col), "{col} missing:\n{table}");
    }
    let explain = cluster.kubectl_ok(&["explain", "bmx.spec.retention"]);
    assert!(
        explain.contains("bounce"),
        "kubectl explain shows the field doc:\n{explain}"
    );
}
