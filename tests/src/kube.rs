//! The real Kubernetes tier: a v1.20 kube-apiserver + etcd + kube-controller-manager started
//! once per test binary by `tests/infra/kube/start.sh` (with `KUBE_OWNER_PID`, so the cluster
//! stops when the test binary exits, even on a crash), the operator as a real process, kubectl,
//! and the test playing the kubelet where pods must run (bind to a fake node, set the status
//! with a pod IP on 127.0.0.0/8 where a real mx-pod listens).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};

pub use crate::eventually;
use crate::{
    Admin, MxPod, MxPodConfig, Primary, free_port, repo, require_root,
    scenarios::{self, Deployment, Rollout, Tier},
    state_dir,
};

/// The cluster of this test binary.
pub struct Cluster {
    pub state: PathBuf,
    pub bin_dir: PathBuf,
}

/// The kube binaries' directory (built by `make deps`).
pub fn kube_bin_dir() -> PathBuf {
    std::env::var("BACKUPMX_KUBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/backupmx/kube-1.20/bin")
        })
}

/// Starts the cluster on first use and applies the BackupMx CRD from `crds/`.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        require_root();
        let bin_dir = kube_bin_dir();
        for b in ["kube-apiserver", "kube-controller-manager", "kubectl"] {
            assert!(
                bin_dir.join(b).exists(),
                "{} is missing: run `make deps` (it builds the Kubernetes 1.20 control plane \
                 into {})",
                bin_dir.join(b).display(),
                bin_dir.display()
            );
        }
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "etcd is not installed: run `make deps`"
        );
        // a directory the watchdog purges when this process exits
        let state = state_dir("kube").keep();
        let out = Command::new("bash")
            .arg(repo().join("tests/infra/kube/start.sh"))
            .arg(&state)
            .env("KUBE_BIN_DIR", &bin_dir)
            .env("KUBE_OWNER_PID", std::process::id().to_string())
            .env("KUBE_WITH_SCHEDULER", "0")
            .env_remove("KUBE_API_PORT")
            .env_remove("KUBECONFIG")
            .output()
            .expect("run tests/infra/kube/start.sh");
        assert!(
            out.status.success(),
            "starting the API server failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { state, bin_dir };
        let applied = cluster.kubectl(&[
            "apply",
            "-f",
            &repo().join("crds/backupmx.yaml").to_string_lossy(),
        ]);
        assert!(
            applied.status.success(),
            "applying the CRD: {}",
            text(&applied)
        );
        let established = cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/backupmxes.backupmx.io",
        ]);
        assert!(established.status.success(), "{}", text(&established));
        cluster
    })
}

/// stdout + stderr of a command.
pub fn text(out: &Output) -> String {
    let mut t = String::from_utf8_lossy(&out.stdout).into_owned();
    t.push_str(&String::from_utf8_lossy(&out.stderr));
    t
}

impl Cluster {
    pub fn kubeconfig(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    /// Runs the cluster's kubectl (v1.20) with its kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin_dir.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .expect("run kubectl")
    }

    /// kubectl that must succeed; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl -n NS get WHAT -o json`, or None when it fails (e.g. not found).
    pub fn get(&self, ns: &str, what: &str) -> Option<Value> {
        let out = self.kubectl(&["-n", ns, "get", what, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("kubectl JSON"))
    }

    /// `kubectl apply` of one object (in `ns`, or cluster-scoped).
    pub fn apply(&self, ns: Option<&str>, obj: &Value) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("obj.json");
        fs::write(&file, obj.to_string()).unwrap();
        let file = file.to_string_lossy().into_owned();
        match ns {
            Some(ns) => self.kubectl_ok(&["-n", ns, "apply", "-f", &file]),
            None => self.kubectl_ok(&["apply", "-f", &file]),
        };
    }

    /// `kubectl patch` of a merge patch onto `what` (e.g. `bmx/example`) in `ns`.
    pub fn patch(&self, ns: &str, what: &str, patch: &Value) {
        self.kubectl_ok(&[
            "-n",
            ns,
            "patch",
            what,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
    }

    /// The events of `ns` (events.k8s.io/v1) as JSON text.
    pub fn events(&self, ns: &str) -> String {
        self.kubectl_ok(&["-n", ns, "get", "events.v1.events.k8s.io", "-o", "json"])
    }

    /// A kube-rs client (admin).
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("read kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kubeconfig");
        Client::try_from(config).expect("client")
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = format!(
            "{prefix}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros()
                % 100_000_000
        );
        let api: Api<Namespace> = Api::all(self.client().await);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .expect("create namespace");
        name
    }
}

/// The `backupmx-operator` binary, built once per test run.
pub fn operator_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = crate::clean_cargo_env(&mut Command::new(cargo))
            .current_dir(repo())
            .args([
                "build",
                "-q",
                "-p",
                "backupmx-operator",
                "--bin",
                "backupmx-operator",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building backupmx-operator failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join("target"));
        target.join("debug").join("backupmx-operator")
    })
    .clone()
}

/// A running operator process.
pub struct Operator {
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics: String,
    pub identity: String,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts the operator against `cluster`; `args` are extra `run` flags (e.g.
    /// `--namespace NS`, `--leader-elect=false`).
    pub fn start(cluster: &Cluster, identity: &str, args: &[&str]) -> Operator {
        let fixed = [
            "run",
            "--identity",
            identity,
            "--mxpod-image",
            "backupmx/mx-pod:test",
        ];
        let all: Vec<String> = fixed.iter().chain(args).map(|a| a.to_string()).collect();
        start_operator_as(
            &cluster.kubeconfig(),
            identity,
            &all,
            &[("RUST_LOG".into(), "info,backupmx_operator=debug".into())],
        )
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9` the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        for _ in 0..600 {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("operator did not stop within 30 s:\n{}", self.log_text());
    }

    /// GET a path of its HTTP endpoint (`/metrics`, `/healthz`), or None while it is not up.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("{}{path}", self.metrics)).await.ok()?;
        Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
    }

    /// Value of `backupmx_reconcile_total` for one object (0 when absent).
    pub async fn reconciles(&self, ns: &str, name: &str) -> u64 {
        let Some((_, text)) = self.get("/metrics").await else {
            return 0;
        };
        let needle = format!("backupmx_reconcile_total{{namespace=\"{ns}\",name=\"{name}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Reconcile passes of one object that have finished (the duration histogram's count,
    /// recorded as a pass ends; 0 when absent): after it grows, that pass's writes are done.
    pub async fn finished_reconciles(&self, ns: &str, name: &str) -> u64 {
        let Some((_, text)) = self.get("/metrics").await else {
            return 0;
        };
        let needle = format!(
            "backupmx_reconcile_duration_seconds_count{{namespace=\"{ns}\",name=\"{name}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Pokes the BackupMx `name` (an annotation) and waits until a reconcile pass that started
    /// after the poke has finished, so whatever that pass writes is written.
    pub async fn another_pass(&self, cluster: &Cluster, ns: &str, name: &str) {
        let passes = self.reconciles(ns, name).await;
        cluster.kubectl_ok(&["-n", ns, "annotate", &format!("bmx/{name}"), "test/poke=1"]);
        eventually(
            "another reconcile pass",
            Duration::from_secs(30),
            || async { (self.finished_reconciles(ns, name).await > passes).then_some(()) },
        )
        .await;
    }
}

/// The objects the operator makes for a BackupMx named `example` (the chart tests' and the
/// reconcile tests' fixture), as kubectl names them.
pub const EXAMPLE_OBJECTS: [&str; 7] = [
    "statefulset/example",
    "service/example-smtp",
    "service/example-pods",
    "configmap/example-config",
    "secret/example-admin-token",
    "poddisruptionbudgets.v1beta1.policy/example",
    "networkpolicy/example-mx-pod",
];

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

// === playing the kubelet ===

/// Creates (once) a Ready fake node for pods to be bound to.
pub async fn fake_node(client: &Client) -> String {
    let name = "fake-node".to_string();
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(&name).await.unwrap().is_none() {
        let _ = nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name,
                    "labels": {"kubernetes.io/hostname": name}}}))
                .unwrap(),
            )
            .await;
    }
    nodes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "fake", "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            }})),
        )
        .await
        .expect("node status");
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await
        .expect("node taints");
    name
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Makes pod `ns/name` Running and Ready at `ip`: bound to the fake node, status as a kubelet
/// would report it. Waits for the StatefulSet controller to make the pod first.
pub async fn run_pod(client: &Client, ns: &str, name: &str, ip: &str) {
    let node = fake_node(client).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = eventually(
        &format!("pod {ns}/{name}"),
        Duration::from_secs(90),
        || async { pods.get_opt(name).await.ok()? },
    )
    .await;
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .is_none()
    {
        let binding = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        let request = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/binding"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&binding).unwrap())
            .unwrap();
        let _: Value = client.request(request).await.expect("bind pod");
    }
    let ts = now();
    let containers: Vec<Value> = pod
        .spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            json!({"name": c, "ready": true, "restartCount": 0, "image": "test", "imageID": "test",
                   "started": true, "state": {"running": {"startedAt": ts}}})
        })
        .collect();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": ts});
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "startTime": ts,
            "conditions": [cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
            "containerStatuses": containers,
        }})),
    )
    .await
    .expect("pod status");
}

/// Resource versions of the named objects of `kind` in `ns` (for idempotence checks).
pub fn resource_versions(
    cluster: &Cluster,
    ns: &str,
    objects: &[&str],
) -> BTreeMap<String, String> {
    objects
        .iter()
        .map(|o| {
            let rv = cluster.kubectl_ok(&[
                "-n",
                ns,
                "get",
                o,
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ]);
            (o.to_string(), rv)
        })
        .collect()
}

/// The object's condition of `type_` as (status, reason, message).
pub fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// Names of things for log messages.
pub fn names<K: ResourceExt>(objs: &[K]) -> Vec<String> {
    objs.iter().map(|o| o.name_any()).collect()
}

/// Starts the operator with another identity than the cluster's admin: `kubeconfig` (e.g. one
/// holding a ServiceAccount's token), `args` exactly as given (they start with `run`; the
/// caller leaves `--metrics-addr` out: a free local port is added) and extra environment (e.g.
/// `POD_NAMESPACE`, `POD_NAME`, `RUST_LOG`, as a Deployment's downward API would set them).
/// `identity` names the replica in [`Operator::identity`] (pass the same as `POD_NAME`).
pub fn start_operator_as(
    kubeconfig: &Path,
    identity: &str,
    args: &[String],
    env: &[(String, String)],
) -> Operator {
    let dir = state_dir("operator");
    let log = dir.path().join("operator.log");
    let port = free_port();
    let file = fs::File::create(&log).unwrap();
    let child = Command::new(operator_bin())
        .args(args)
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .env_remove("WATCH_NAMESPACE")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .env_remove("MXPOD_IMAGE")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start backupmx-operator");
    Operator {
        child: Some(child),
        log,
        metrics: format!("http://127.0.0.1:{port}"),
        identity: identity.into(),
        _dir: dir,
    }
}

/// A Secret `name` holding the PEM CA bundle `pem` under `ca.crt`, the default key of
/// `spec.caBundle`.
pub fn ca_bundle_secret(name: &str, pem: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
           "stringData": {"ca.crt": pem}})
}

/// What the operator made for BackupMx `name` that a pod uses: the rendered `mx-pod.toml` (its
/// ConfigMap) and the admin token (its Secret), once both exist.
pub async fn rendered_pod_config(client: &Client, ns: &str, name: &str) -> (String, String) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let toml = eventually(
        "the rendered ConfigMap",
        Duration::from_secs(60),
        || async {
            cms.get_opt(&format!("{name}-config"))
                .await
                .ok()??
                .data?
                .get("mx-pod.toml")
                .cloned()
        },
    )
    .await;
    (toml, admin_token(client, ns, name).await)
}

/// The admin token of BackupMx `name`, from the Secret the operator makes.
pub async fn admin_token(client: &Client, ns: &str, name: &str) -> String {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    eventually(
        "the admin-token Secret",
        Duration::from_secs(60),
        || async {
            let s = secrets
                .get_opt(&format!("{name}-admin-token"))
                .await
                .ok()??;
            String::from_utf8(s.data?.get("token")?.0.clone()).ok()
        },
    )
    .await
}

// === the API-server tier of the shared scenarios ===

/// The API-server tier: the real API server and controller manager, each pod of the
/// StatefulSet a real mx-pod process at `127.0.0.{ip_base + ordinal}` (SMTP and admin on the
/// rendered ports), the test playing the kubelet. Each test takes its own `ip_base`.
pub struct ApiTier {
    pub ip_base: u8,
}

impl Tier for ApiTier {
    type Primary = Primary;
    type Deployment = ApiDeployment;

    fn start_primary(&self) -> Primary {
        Primary::start()
    }

    async fn deploy(
        &self,
        prefix: &str,
        primary: &Primary,
        replicas: usize,
        extra: Value,
        prepare: impl FnOnce(&Cluster, &str),
    ) -> ApiDeployment {
        let bmx = scenarios::backupmx("127.0.0.1", primary.port, replicas, extra);
        ApiDeployment::start(
            self.ip_base,
            prefix,
            &primary.addr(),
            bmx,
            replicas,
            prepare,
        )
        .await
    }
}

/// A BackupMx `example` in its own namespace, its operator, and its pods played by mx-pods.
pub struct ApiDeployment {
    cluster: &'static Cluster,
    pub ns: String,
    pub op: Operator,
    pods: Vec<Option<MxPod>>,
    /// Replaced pods' processes: kept (stopped) because their directory holds the volume.
    retired: Vec<MxPod>,
    ips: Vec<String>,
    /// The pod object each process plays, and whether it was told to stop.
    uids: Vec<String>,
    stopping: Vec<bool>,
    token: String,
}

impl ApiDeployment {
    /// A namespace, the operator watching it, `prepare(cluster, ns)`, the BackupMx `bmx`, and
    /// its `replicas` pods running mx-pods that send to `primary` (`host:port`).
    pub async fn start(
        ip_base: u8,
        prefix: &str,
        primary: &str,
        bmx: Value,
        replicas: usize,
        prepare: impl FnOnce(&Cluster, &str),
    ) -> ApiDeployment {
        let cluster = cluster();
        let ns = cluster.namespace(prefix).await;
        let op = Operator::start(
            cluster,
            &format!("op-{prefix}"),
            &["--namespace", &ns, "--leader-elect=false"],
        );
        prepare(cluster, &ns);
        cluster.apply(Some(&ns), &bmx);
        let token = admin_token(&cluster.client().await, &ns, "example").await;
        let mut me = ApiDeployment {
            cluster,
            ns,
            op,
            pods: Vec::new(),
            retired: Vec::new(),
            ips: Vec::new(),
            uids: Vec::new(),
            stopping: Vec::new(),
            token,
        };
        for i in 0..replicas {
            me.ips.push(format!("127.0.0.{}", ip_base as usize + i));
            me.pods.push(None);
            me.uids.push(String::new());
            me.stopping.push(false);
            me.run(i, primary).await;
        }
        me
    }

    /// The mx-pod playing pod `i`.
    pub fn pod(&self, i: usize) -> &MxPod {
        self.pods[i].as_ref().expect("running")
    }

    async fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.cluster.client().await, &self.ns)
    }

    /// Starts the mx-pod of pod `i` (again, on the same queue directory: the same volume)
    /// against `primary`, once the StatefulSet has made the pod, and marks the pod running.
    async fn run(&mut self, i: usize, primary: &str) {
        let pods = self.pods_api().await;
        let name = format!("example-{i}");
        eventually(&format!("pod {name}"), Duration::from_secs(90), || async {
            pods.get_opt(&name)
                .await
                .ok()?
                .filter(|p| p.metadata.deletion_timestamp.is_none())
        })
        .await;
        let mut cfg = MxPodConfig::new(primary);
        cfg.ip = self.ips[i].parse().unwrap();
        cfg.admin_port = Some(backupmx_operator::render::ADMIN_PORT);
        cfg.smtp_port = Some(backupmx_operator::render::SMTP_PORT);
        cfg.token = Some(self.token.clone());
        cfg.workers = 0; // as rendered: the operator decides
        cfg.rate = 2;
        let pod = match self.pods[i].take() {
            Some(mut old) => {
                old.kill9();
                let dir = old.queue_dir.clone();
                self.retired.push(old);
                MxPod::start_with_queue_dir(state_dir("mxpod"), dir, cfg).await
            }
            None => MxPod::start(cfg).await,
        };
        self.pods[i] = Some(pod);
        self.stopping[i] = false;
        run_pod(&self.cluster.client().await, &self.ns, &name, &self.ips[i]).await;
        let p = pods.get(&name).await.expect("the pod just run");
        self.uids[i] = p.metadata.uid.unwrap_or_default();
    }

    /// The kubelet's part of deleting pod `i`: SIGTERM once (transactions in flight finish),
    /// and once the process has exited, the pod object goes. Returns whether it is gone.
    async fn stop_step(&mut self, i: usize) -> bool {
        let pod = self.pods[i].as_mut().expect("running");
        if !self.stopping[i] {
            pod.sigterm();
            self.stopping[i] = true;
            return false;
        }
        if !pod.exited() {
            return false;
        }
        let pods = self.pods_api().await;
        let name = format!("example-{i}");
        let _ = pods
            .delete(&name, &DeleteParams::default().grace_period(0))
            .await;
        true
    }

    /// The state of pod `i`'s object: None when gone or another incarnation.
    async fn object(&self, i: usize) -> Result<Option<Pod>, kube::Error> {
        let pods = self.pods_api().await;
        let p = pods.get_opt(&format!("example-{i}")).await?;
        Ok(p.filter(|p| p.metadata.uid.as_deref() == Some(self.uids[i].as_str())))
    }
}

impl Deployment for ApiDeployment {
    fn cluster(&self) -> &Cluster {
        self.cluster
    }
    fn ns(&self) -> &str {
        &self.ns
    }
    fn operator(&self) -> &Operator {
        &self.op
    }
    fn smtp(&self, i: usize) -> std::net::SocketAddr {
        self.pod(i).smtp
    }
    fn admin(&self, i: usize) -> Admin {
        let p = self.pod(i);
        Admin::new(
            p.admin.clone(),
            &self.token,
            mx_pod::trust::Trust::webpki().client(),
        )
    }

    async fn crash(&mut self, i: usize) {
        let pod = self.pods[i].as_mut().expect("running");
        pod.kill9();
        pod.restart().await;
    }

    async fn roll(&mut self, i: usize, primary: &str) -> Rollout {
        match self.object(i).await {
            Err(_) => Rollout::Running,
            Ok(Some(p)) if p.metadata.deletion_timestamp.is_none() => Rollout::Running,
            // the StatefulSet controller deletes the pod of the old revision
            Ok(Some(_)) => {
                if self.stop_step(i).await {
                    self.run(i, primary).await;
                    Rollout::Replaced
                } else {
                    Rollout::Terminating
                }
            }
            Ok(None) => {
                self.run(i, primary).await;
                Rollout::Replaced
            }
        }
    }

    /// Besides stopping it: the pod is empty and draining before it goes.
    async fn removed(&mut self, i: usize) {
        let (_, q) = self.pod(i).get("/v1/queue").await;
        assert_eq!(q["messages"], 0, "pod {i} is empty before it goes: {q}");
        assert_eq!(q["draining"], true, "{q}");
        eventually(
            &format!("pod example-{i} deleted by the StatefulSet"),
            Duration::from_secs(90),
            || async {
                let p = self.object(i).await.ok()?;
                p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
                    .then_some(())
            },
        )
        .await;
        let deadline = std::time::Instant::now() + scenarios::POD_TIMEOUT;
        while !self.stop_step(i).await {
            assert!(
                std::time::Instant::now() < deadline,
                "pod {i}'s mx-pod did not stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
