//! The real-node tier: a v1.20 control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler: `tests/infra/kube/start.sh`) plus a real node (containerd, runc, the CNI
//! bridge, kubelet: `tests/infra/node/start.sh`), started once per test binary. The StatefulSet
//! the operator makes is run by the kubelet from the `backupmx/mx-pod:VERSION` image
//! (`tests/infra/node/mx-pod-image.sh`, imported into containerd), its volume claims bind to
//! hostPath PersistentVolumes the harness makes ([`Node::volumes`]), and the operator runs
//! outside the cluster as a process ([`Node::operator`]) that reaches the pods on their pod IPs
//! through the node's bridge.
//!
//! Network: loopback and the node's bridge only. The host owns the bridge's gateway address
//! ([`Node::gateway`], 10.244.0.1): pods reach the host there (a [`BridgePrimary`] listens on
//! it) and the host reaches the pods on their pod IPs (10.244.0.0/24). Pods have no default
//! route.
//!
//! Both scripts get this process' PID (`KUBE_OWNER_PID`, `KNODE_OWNER_PID`): when the test
//! binary exits, even by a crash, their watchdogs stop everything and restore the host (bridge,
//! iptables chains, cgroups, sysctls) within a second or two.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    ops::Deref,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, OnceLock, atomic::AtomicUsize},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{
    Admin, Primary, clean_cargo_env, free_port_on,
    kube::{Cluster, Operator, eventually, kube_bin_dir, operator_bin, start_operator_as, text},
    repo, require, require_root,
    scenarios::{self, Deployment, Rollout, Tier, TierPrimary},
    state_dir,
};

pub use crate::scenarios::POD_TIMEOUT;

/// The StorageClass the harness' PersistentVolumes belong to (no provisioner: the volumes are
/// made by [`Node::volumes`]).
pub const STORAGE_CLASS: &str = "backupmx-local";

/// uid and gid the mx-pod image runs as (hostPath volumes get no fsGroup: the harness chowns).
pub const POD_UID: u32 = 65532;

/// The control plane and the node of this test binary.
pub struct Node {
    /// The control plane (kubeconfig, kubectl).
    pub cluster: Cluster,
    /// The node's state directory (`tests/infra/node/start.sh STATEDIR`); the volumes live in
    /// `STATEDIR/volumes/`, so the watchdog's purge removes them too.
    pub state: PathBuf,
    /// The node's name.
    pub name: String,
    /// The host's address on the pod network (the bridge's gateway).
    pub gateway: Ipv4Addr,
    /// An address on the pod network no pod gets (`KNODE_LB_IP`): what the harness writes into
    /// a LoadBalancer Service's `status.loadBalancer.ingress`, as a cloud controller would;
    /// kube-proxy routes it to the Service's pods.
    pub lb_ip: Ipv4Addr,
    /// The mx-pod image the pods run (`backupmx/mx-pod:VERSION`).
    pub image: String,
    /// How long the pieces took to come up (printed by [`node`]).
    pub timings: Timings,
}

/// Start-up times, for the record.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub image: Duration,
    pub operator_build: Duration,
    pub control_plane: Duration,
    pub node: Duration,
}

/// Fails the test unless every binary and package the node tier needs is there.
fn require_node_parts(bin: &Path) {
    require_root();
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kubelet",
        "kube-proxy",
        "knode-cri",
    ] {
        assert!(
            bin.join(b).exists(),
            "{} is missing: run `make deps` (tests/infra/kube/build.sh and \
             tests/infra/node/build.sh build the Kubernetes 1.20 binaries into {})",
            bin.join(b).display(),
            bin.display()
        );
    }
    for cmd in [
        "etcd",
        "containerd",
        "runc",
        "ctr",
        "iptables",
        "nft",
        "gcc",
        "postfix",
    ] {
        require(cmd);
    }
    assert!(
        Path::new("/usr/lib/cni/bridge").exists() && Path::new("/usr/lib/cni/host-local").exists(),
        "the CNI plugins are not installed: run `make deps` (containernetworking-plugins)"
    );
}

fn run_script(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    out
}

/// Builds (incrementally) and returns the mx-pod image tarball and its reference.
pub fn mxpod_image() -> (PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let mut cmd = Command::new("bash");
            cmd.arg(repo().join("tests/infra/node/mx-pod-image.sh"))
                .current_dir(repo());
            let out = run_script(
                "tests/infra/node/mx-pod-image.sh",
                clean_cargo_env(&mut cmd),
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut lines = stdout.lines();
            let tar = PathBuf::from(lines.next().expect("tarball path"));
            let image = lines.next().expect("image reference").to_owned();
            assert!(tar.exists(), "{} missing", tar.display());
            (tar, image)
        })
        .clone()
}

/// Starts the control plane and the node on first use (once per test binary), applies the
/// BackupMx CRD and the StorageClass.
pub fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let bin_dir = kube_bin_dir();
        require_node_parts(&bin_dir);

        let t = Instant::now();
        let (tarball, image) = mxpod_image();
        let image_time = t.elapsed();
        let t = Instant::now();
        operator_bin();
        let operator_build = t.elapsed();

        // the control plane, with the scheduler; the API server reaches the kubelet on the
        // node's InternalIP (the bridge), not on the host name
        let t = Instant::now();
        let kstate = state_dir("kube").keep();
        run_script(
            "tests/infra/kube/start.sh",
            Command::new("bash")
                .arg(repo().join("tests/infra/kube/start.sh"))
                .arg(&kstate)
                .env("KUBE_BIN_DIR", &bin_dir)
                .env("KUBE_OWNER_PID", std::process::id().to_string())
                .env("KUBE_WITH_KCM", "1")
                .env("KUBE_WITH_SCHEDULER", "1")
                .env(
                    "KUBE_APISERVER_EXTRA_ARGS",
                    "--kubelet-preferred-address-types=InternalIP",
                )
                .env_remove("KUBE_API_PORT")
                .env_remove("KUBECONFIG"),
        );
        let control_plane = t.elapsed();

        // the node, with the image imported, and kube-proxy (a LoadBalancer Service's address
        // reaches the pods)
        let t = Instant::now();
        let state = state_dir("node").keep();
        run_script(
            "tests/infra/node/start.sh",
            Command::new("bash")
                .arg(repo().join("tests/infra/node/start.sh"))
                .arg(&state)
                .arg(&kstate)
                .env("KUBE_BIN_DIR", &bin_dir)
                .env("KNODE_BIN_DIR", &bin_dir)
                .env("KNODE_OWNER_PID", std::process::id().to_string())
                .env("KNODE_WITH_PROXY", "1")
                .env("KNODE_IMAGES", &tarball)
                .env_remove("KUBECONFIG"),
        );
        let node_time = t.elapsed();
        let env = fs::read_to_string(state.join("env")).expect("node env");
        let var = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {k}=")))
                .unwrap_or_else(|| panic!("{k} in the node's env"))
                .to_owned()
        };
        let node = Node {
            cluster: Cluster {
                state: kstate,
                bin_dir,
            },
            name: var("KNODE_NAME"),
            gateway: var("KNODE_GATEWAY").parse().expect("gateway address"),
            lb_ip: var("KNODE_LB_IP")
                .parse()
                .expect("KNODE_LB_IP: the node's pod network must be a /24"),
            state,
            image,
            timings: Timings {
                image: image_time,
                operator_build,
                control_plane,
                node: node_time,
            },
        };
        fs::create_dir_all(node.state.join("volumes")).unwrap();

        let c = &node.cluster;
        c.kubectl_ok(&[
            "apply",
            "-f",
            &repo().join("crds/backupmx.yaml").to_string_lossy(),
        ]);
        c.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/backupmxes.backupmx.io",
        ]);
        node.apply(
            None,
            &json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS},
                "provisioner": "kubernetes.io/no-provisioner",
                "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Retain"}),
        );
        println!(
            "node tier up: image {:.1?}, operator build {:.1?}, control plane {:.1?}, node {} \
             Ready {:.1?} (gateway {})",
            node.timings.image,
            node.timings.operator_build,
            node.timings.control_plane,
            node.name,
            node.timings.node,
            node.gateway
        );
        node
    })
}

impl Node {
    /// A kube-rs client (admin).
    pub async fn client(&self) -> Client {
        self.cluster.client().await
    }

    /// kubectl that must succeed; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.cluster.kubectl_ok(args)
    }

    /// `kubectl -n NS get WHAT -o json`, or None when it fails (e.g. not found).
    pub fn get(&self, ns: &str, what: &str) -> Option<Value> {
        self.cluster.get(ns, what)
    }

    /// `kubectl apply` of one object (in `ns`, or cluster-scoped).
    pub fn apply(&self, ns: Option<&str>, obj: &Value) {
        self.cluster.apply(ns, obj)
    }

    /// A new namespace (unique name starting with `prefix`) whose default ServiceAccount exists
    /// (pods are refused until it does).
    pub async fn namespace(&self, prefix: &str) -> String {
        let ns = self.cluster.namespace(prefix).await;
        let sas: Api<ServiceAccount> = Api::namespaced(self.client().await, &ns);
        eventually(
            "the namespace's default ServiceAccount",
            Duration::from_secs(60),
            || async { sas.get_opt("default").await.ok().flatten() },
        )
        .await;
        ns
    }

    /// Makes the volumes of a StatefulSet's claims `CLAIM-STS-0..replicas` in `ns`: one hostPath
    /// PersistentVolume each (class [`STORAGE_CLASS`], `size`, reclaim Retain, pre-bound to the
    /// claim through `claimRef`), its directory under the node's state dir, owned by the pods'
    /// uid. Returns the directories (the pods' queues are visible there from the host).
    pub fn volumes(
        &self,
        ns: &str,
        claim: &str,
        sts: &str,
        replicas: usize,
        size: &str,
    ) -> Vec<PathBuf> {
        (0..replicas)
            .map(|i| {
                let claim_name = format!("{claim}-{sts}-{i}");
                let pv = format!("{ns}-{claim_name}");
                let dir = self.state.join("volumes").join(&pv);
                fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::chown(&dir, Some(POD_UID), Some(POD_UID)).unwrap();
                self.apply(
                    None,
                    &json!({"apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": pv, "labels": {"backupmx.test/namespace": ns}},
                    "spec": {
                        "capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                        "storageClassName": STORAGE_CLASS,
                        "persistentVolumeReclaimPolicy": "Retain",
                        "volumeMode": "Filesystem",
                        "claimRef": {"namespace": ns, "name": claim_name},
                        "hostPath": {"path": dir, "type": "Directory"},
                    }}),
                );
                dir
            })
            .collect()
    }

    /// Starts the operator as a process outside the cluster, watching `ns` only, without
    /// leader election, with `--mxpod-image` = the imported image.
    pub fn operator(&self, ns: &str, identity: &str) -> Operator {
        self.operator_with(ns, identity, &["--leader-elect=false"])
    }

    /// [`Node::operator`] with other `run` flags instead of `--leader-elect=false` (e.g. leader
    /// election through a Lease in `ns`).
    pub fn operator_with(&self, ns: &str, identity: &str, extra: &[&str]) -> Operator {
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            ns,
            "--identity",
            identity,
            "--mxpod-image",
            &self.image,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        start_operator_as(
            &self.cluster.kubeconfig(),
            identity,
            &args,
            &[("RUST_LOG".into(), "info,backupmx_operator=debug".into())],
        )
    }

    /// Waits until pod `ns/name` is Running and Ready (as the kubelet reports it), not being
    /// deleted, and, when `not_uid` is given, is not that (an older) incarnation; returns it.
    pub async fn ready_pod(
        &self,
        ns: &str,
        name: &str,
        not_uid: Option<&str>,
        timeout: Duration,
    ) -> RunningPod {
        let pods: Api<Pod> = Api::namespaced(self.client().await, ns);
        let pod = eventually(
            &format!("pod {ns}/{name} Ready on the node"),
            timeout,
            || async {
                let p = pods.get_opt(name).await.ok()??;
                if not_uid.is_some_and(|u| p.metadata.uid.as_deref() == Some(u)) {
                    return None;
                }
                ready_ip(&p).map(|_| p)
            },
        )
        .await;
        let status = pod.status.as_ref().unwrap();
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(self.name.as_str()),
            "scheduled to the real node"
        );
        let container_id = status
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .and_then(|c| c.container_id.clone())
            .unwrap_or_default();
        RunningPod {
            ns: ns.to_owned(),
            name: name.to_owned(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ip: ready_ip(&pod).expect("a Ready pod's IP"),
            container_id: container_id
                .strip_prefix("containerd://")
                .unwrap_or(&container_id)
                .to_owned(),
        }
    }

    /// Waits until `pod`'s container has restarted (kill -9) and is Ready again; checks that it
    /// is the same pod (same uid), its container restarted by the kubelet.
    pub async fn wait_restarted(&self, pod: &RunningPod) -> RunningPod {
        let pods: Api<Pod> = Api::namespaced(self.client().await, &pod.ns);
        eventually("the container restarted and Ready", POD_TIMEOUT, || async {
            let p = pods.get(&pod.name).await.ok()?;
            let c = p.status?.container_statuses?.into_iter().next()?;
            (c.restart_count >= 1 && c.ready).then_some(())
        })
        .await;
        let restarted = self.ready_pod(&pod.ns, &pod.name, None, POD_TIMEOUT).await;
        assert_eq!(
            restarted.uid, pod.uid,
            "the same pod, its container restarted"
        );
        restarted
    }

    /// Plays the cloud controller: gives LoadBalancer Service `ns/name` the address `ip` in
    /// `status.loadBalancer.ingress` (once the Service exists).
    pub async fn set_load_balancer(&self, ns: &str, name: &str, ip: IpAddr) {
        let svcs: Api<Service> = Api::namespaced(self.client().await, ns);
        let svc = eventually(
            &format!("Service {ns}/{name}"),
            Duration::from_secs(60),
            || async { svcs.get_opt(name).await.ok()? },
        )
        .await;
        assert_eq!(
            svc.spec.and_then(|s| s.type_).as_deref(),
            Some("LoadBalancer"),
            "{name} is a LoadBalancer Service"
        );
        svcs.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}}),
            ),
        )
        .await
        .expect("patch the Service's status");
    }

    /// Waits until pod `ns/name` with `uid` is gone from the API (the kubelet finished it).
    pub async fn pod_gone(&self, ns: &str, name: &str, uid: &str, timeout: Duration) {
        let pods: Api<Pod> = Api::namespaced(self.client().await, ns);
        eventually(
            &format!("pod {ns}/{name} (uid {uid}) to be gone"),
            timeout,
            || async {
                match pods.get_opt(name).await {
                    Ok(None) => Some(()),
                    Ok(Some(p)) => (p.metadata.uid.as_deref() != Some(uid)).then_some(()),
                    Err(_) => None,
                }
            },
        )
        .await;
    }

    /// The admin token of BackupMx `name` (its Secret), once the operator made it.
    pub async fn admin_token(&self, ns: &str, name: &str) -> String {
        crate::kube::admin_token(&self.client().await, ns, name).await
    }

    /// `kubectl exec` of a command in the pod's container (the image has no shell: give the
    /// program and its arguments); returns (success, stdout+stderr).
    pub fn exec(&self, pod: &RunningPod, cmd: &[&str]) -> (bool, String) {
        let mut args = vec!["-n", &pod.ns, "exec", &pod.name, "--"];
        args.extend_from_slice(cmd);
        let out = self.cluster.kubectl(&args);
        (out.status.success(), text(&out))
    }

    /// Deletes a pod (graceful, as a person or a controller would); returns at once.
    pub async fn delete_pod(&self, pod: &RunningPod) {
        let pods: Api<Pod> = Api::namespaced(self.client().await, &pod.ns);
        pods.delete(&pod.name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }

    /// `kill -9` of the pod's container process from the host (the kubelet restarts it): its
    /// PIDs are found through the container's cgroup, by container ID.
    pub fn kill_container(&self, pod: &RunningPod) -> usize {
        assert!(
            !pod.container_id.is_empty(),
            "no container ID for {}",
            pod.name
        );
        let mut killed = 0;
        for hierarchy in ["pids", "memory", "cpu", "systemd", "unified", ""] {
            let root = Path::new("/sys/fs/cgroup").join(hierarchy).join("kubepods");
            for dir in find_dirs(&root, &pod.container_id) {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let ok = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status()
                        .is_ok_and(|s| s.success());
                    killed += usize::from(ok);
                }
            }
            if killed > 0 {
                break;
            }
        }
        assert!(
            killed > 0,
            "no process of container {} found",
            pod.container_id
        );
        killed
    }

    /// Mounts a tmpfs of `size` (e.g. `12m`) owned by the pods' uid on a volume's directory,
    /// inside the node's mount namespace (where the kubelet and containerd see it; the host's
    /// mounts do not propagate there). Unmounted when the guard is dropped.
    pub fn mount_small_volume(&self, dir: &Path, size: &str) -> SmallVolume {
        let holder = fs::read_to_string(self.state.join("nsholder.pid"))
            .expect("the node's namespace holder PID");
        let nsenter = |args: &[&str]| {
            let out = Command::new("nsenter")
                .args(["-t", holder.trim(), "-m", "--"])
                .args(args)
                .output()
                .expect("run nsenter");
            assert!(
                out.status.success(),
                "{args:?} in the node's namespace: {}",
                text(&out)
            );
        };
        let options = format!("size={size},uid={POD_UID},gid={POD_UID},mode=0750");
        nsenter(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            &dir.to_string_lossy(),
        ]);
        SmallVolume {
            holder: holder.trim().to_owned(),
            dir: dir.to_owned(),
        }
    }

    /// Deletes the namespace (and with it the pods) without waiting; the volumes stay until the
    /// node is purged.
    pub fn delete_namespace(&self, ns: &str) {
        let _ = self
            .cluster
            .kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }
}

/// A small filesystem on a volume's directory ([`Node::mount_small_volume`]); unmounted when
/// dropped.
pub struct SmallVolume {
    holder: String,
    dir: PathBuf,
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .args(["-t", &self.holder, "-m", "--", "umount", "-l"])
            .arg(&self.dir)
            .status();
    }
}

/// Directories named `name` below `root` (cgroup trees are shallow).
fn find_dirs(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = e.path();
                if e.file_name() == name {
                    out.push(p.clone());
                }
                stack.push(p);
            }
        }
    }
    out
}

/// A pod the kubelet runs: where to reach it.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub ns: String,
    pub name: String,
    pub uid: String,
    pub ip: IpAddr,
    pub container_id: String,
}

impl RunningPod {
    /// Its SMTP address (the rendered config's port 2525 on the pod IP).
    pub fn smtp(&self) -> SocketAddr {
        SocketAddr::new(self.ip, backupmx_operator::render::SMTP_PORT)
    }

    /// A client of its admin API (port 8025 on the pod IP) with the BackupMx's token.
    pub fn admin(&self, token: &str) -> Admin {
        Admin::new(
            format!(
                "http://{}:{}",
                self.ip,
                backupmx_operator::render::ADMIN_PORT
            ),
            token,
            mx_pod::trust::Trust::webpki()
                .https()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        )
    }
}

// === a primary the pods can reach ===

/// A real Postfix primary (`tests/infra/postfix-primary.sh`, delivering into one maildir) that
/// also listens on the node's gateway address, where the pods reach the host. The script runs
/// it on 127.0.0.1:PORT; each [`BridgePrimary::up`] adds a `GATEWAY:PORT inet smtpd` service
/// to its master.cf and reloads it. Down means stopped: both addresses refuse.
pub struct BridgePrimary {
    inner: Primary,
    pub gateway: Ipv4Addr,
}

impl BridgePrimary {
    /// Starts a primary on a port free on both 127.0.0.1 and the gateway.
    pub fn start(node: &Node) -> BridgePrimary {
        let port = loop {
            let p = free_port_on(IpAddr::V4(node.gateway));
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                break p;
            }
        };
        let mut me = BridgePrimary {
            inner: Primary::start_on(port),
            gateway: node.gateway,
        };
        me.listen_on_gateway();
        me
    }

    /// Where the pods (and the operator's probe) reach it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.gateway), self.inner.port)
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    fn listen_on_gateway(&mut self) {
        let etc = self.inner.dir.path().join("etc");
        let service = format!("{}:{}", self.gateway, self.inner.port);
        let out = Command::new("postconf")
            .arg("-c")
            .arg(&etc)
            .arg("-Me")
            .arg(format!("{service}/inet={service} inet n - n - - smtpd"))
            .output()
            .expect("postconf");
        assert!(out.status.success(), "postconf -M: {}", text(&out));
        let out = Command::new("postfix")
            .arg("-c")
            .arg(&etc)
            .arg("reload")
            .output()
            .expect("postfix reload");
        assert!(out.status.success(), "postfix reload: {}", text(&out));
        let addr = self.addr();
        let start = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "Postfix does not listen on {addr} after reload"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts Postfix again (the maildir and maillog are kept) on both addresses.
    pub fn up(&mut self) {
        self.inner.up();
        self.listen_on_gateway();
    }

    /// Stops Postfix (an outage): both addresses refuse afterwards.
    pub fn down(&mut self) {
        self.inner.down();
        assert!(
            std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_err(),
            "{} still accepts after the primary stopped",
            self.addr()
        );
    }
}

impl Deref for BridgePrimary {
    type Target = Primary;
    fn deref(&self) -> &Primary {
        &self.inner
    }
}

/// Deletes the namespace when dropped (at the end of a test, passed or not), so finished
/// tests' pods do not keep running on the node.
pub struct NamespaceGuard {
    pub ns: String,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        node().delete_namespace(&self.ns);
    }
}

// === a sending MTA under load ===

/// What a [`Load`] did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// The acknowledged Message-IDs in the order the `250`s came (the pod's arrival order).
    pub acked: Vec<String>,
    /// Messages an attempt of which broke off before the reply to the end of DATA was read:
    /// the pod may have kept that copy too (the one duplicate SMTP allows, RFC 5321 §6.1).
    pub uncertain: BTreeSet<String>,
    /// Attempts refused with a `4xx` reply (e.g. `421 4.3.2` while the pod shuts down).
    pub refused: usize,
    /// Attempts that could not connect or broke off.
    pub broken: usize,
}

impl LoadReport {
    /// Checks what a primary received against what was acknowledged: every acknowledged
    /// message arrived (zero loss), no message twice unless an attempt of it broke off, and
    /// the acknowledged messages in arrival order (first copies).
    pub fn check_delivered(&self, received: &[String]) {
        let tag = self.acked.first().and_then(|id| id.split('.').next());
        let mine = tag
            .map(|t| crate::with_tag(received, t))
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        let mut first_copies = Vec::new();
        for id in mine {
            if seen.insert(id.clone()) {
                first_copies.push(id);
            } else {
                assert!(
                    self.uncertain.contains(&id),
                    "{id} delivered twice though every attempt of it got a reply"
                );
            }
        }
        let lost: Vec<&String> = self.acked.iter().filter(|id| !seen.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "acknowledged but never delivered: {lost:?}"
        );
        assert_eq!(
            first_copies, self.acked,
            "delivered in the order the pod acknowledged them"
        );
    }
}

/// The IP of a pod that is Ready and not being deleted (where a Service would send traffic).
fn ready_ip(p: &Pod) -> Option<IpAddr> {
    if p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = p.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then_some(())?;
    status.pod_ip.as_ref()?.parse().ok()
}

/// The SMTP address of pod `name` when it is Ready and not being deleted (where a sender that
/// follows the pod, as a Service would, connects now); None otherwise.
async fn smtp_of(pods: &Api<Pod>, name: &str) -> Option<SocketAddr> {
    let p = pods.get_opt(name).await.ok()??;
    ready_ip(&p).map(|ip| SocketAddr::new(ip, backupmx_operator::render::SMTP_PORT))
}

/// A sending MTA's behaviour, as a task: messages `TAG.0 .. TAG.(n-1)` to pod `ns/name`, one
/// after another, `pace` apart; each is retried (every 200 ms) until it is acknowledged, as an
/// MTA's queue would, following the pod to its new IP when it is replaced. Bounded by `n` and
/// by [`Load::DEADLINE`].
pub struct Load {
    task: tokio::task::JoinHandle<LoadReport>,
    acked: Arc<AtomicUsize>,
    tag: String,
}

impl Load {
    /// The longest a load may run (it panics after that).
    pub const DEADLINE: Duration = Duration::from_secs(300);

    pub fn start(ns: &str, pod: &str, tag: &str, n: usize, pace: Duration) -> Load {
        let acked = Arc::new(AtomicUsize::new(0));
        let (ns, pod, tag_owned) = (ns.to_owned(), pod.to_owned(), tag.to_owned());
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(node().client().await, &ns);
            let started = Instant::now();
            let mut report = LoadReport::default();
            for i in 0..n {
                let id = format!("{tag_owned}.{i}@test");
                let data = crate::message(&tag_owned, i, 2000);
                loop {
                    assert!(
                        started.elapsed() < Self::DEADLINE,
                        "load {tag_owned}: message {i} not acknowledged after {:?}: {report:?}",
                        Self::DEADLINE
                    );
                    let Some(addr) = smtp_of(&pods, &pod).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let attempt = tokio::time::timeout(
                        Duration::from_secs(30),
                        crate::send(addr, "sender@sender.test", &["user@example.test"], &data),
                    )
                    .await;
                    match attempt {
                        Ok(Ok(r)) if r.ok() => break,
                        Ok(Ok(r)) => {
                            assert!(
                                r.code() / 100 == 4,
                                "load {tag_owned}: message {i} refused for good: {r:?}"
                            );
                            report.refused += 1;
                        }
                        _ => {
                            report.broken += 1;
                            report.uncertain.insert(id.clone());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                report.acked.push(id);
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(pace).await;
            }
            report
        });
        Load {
            task,
            acked,
            tag: tag.to_owned(),
        }
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `k` messages were acknowledged.
    pub async fn wait_acked(&self, k: usize) {
        eventually(
            &format!("{k} messages of load {} acknowledged", self.tag),
            Self::DEADLINE,
            || async { (self.acked() >= k).then_some(()) },
        )
        .await;
    }

    /// Waits for the load to finish; its report.
    pub async fn finish(self) -> LoadReport {
        match self.task.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

// === the node tier of the shared scenarios ===

/// A BackupMx `example` ([`scenarios::backupmx`]) whose primary is `primary`, on volumes of
/// the harness' StorageClass.
pub fn backupmx(primary: &BridgePrimary, replicas: usize, extra: Value) -> Value {
    let mut bmx = scenarios::backupmx(
        &primary.gateway.to_string(),
        primary.port(),
        replicas,
        json!({"storage": {"storageClassName": STORAGE_CLASS}}),
    );
    scenarios::merge(&mut bmx["spec"], extra);
    bmx
}

impl TierPrimary for BridgePrimary {
    fn up(&mut self) {
        BridgePrimary::up(self)
    }
    fn down(&mut self) {
        BridgePrimary::down(self)
    }
    fn host(&self) -> String {
        self.gateway.to_string()
    }
    fn port(&self) -> u16 {
        self.inner.port
    }
    fn postfix(&self) -> &Primary {
        &self.inner
    }
}

/// The real node: the kubelet runs the mx-pod image, queues on PersistentVolumes, the operator
/// outside the cluster reaching pods on their IPs.
pub struct NodeTier;

impl Tier for NodeTier {
    type Primary = BridgePrimary;
    type Deployment = Setup;

    fn start_primary(&self) -> BridgePrimary {
        BridgePrimary::start(node())
    }

    async fn deploy(
        &self,
        prefix: &str,
        primary: &BridgePrimary,
        replicas: usize,
        extra: Value,
        prepare: impl FnOnce(&Cluster, &str),
    ) -> Setup {
        Setup::new_with(prefix, primary, replicas, extra, false, |ns, _| {
            prepare(&node().cluster, ns)
        })
        .await
    }
}

/// One scenario's namespace, operator, pods and admin token on the node.
pub struct Setup {
    pub node: &'static Node,
    pub ns: String,
    pub op: Operator,
    pub token: String,
    pub pods: Vec<RunningPod>,
    started: Instant,
    _guard: NamespaceGuard,
}

impl Setup {
    /// A namespace, volumes for `replicas` pods, the operator, the BackupMx; returns once every
    /// pod is Running and Ready on the node.
    pub async fn new(
        prefix: &str,
        primary: &BridgePrimary,
        replicas: usize,
        extra: Value,
    ) -> Setup {
        Self::new_with(prefix, primary, replicas, extra, false, |_, _| {}).await
    }

    /// [`Setup::new`], the operator electing a leader through a Lease in the namespace when
    /// `leader_election`, and `prepare(namespace, volume directories)` run before the
    /// BackupMx is applied.
    pub async fn new_with(
        prefix: &str,
        primary: &BridgePrimary,
        replicas: usize,
        extra: Value,
        leader_election: bool,
        prepare: impl FnOnce(&str, &[PathBuf]),
    ) -> Setup {
        let node = node();
        let started = Instant::now();
        let ns = node.namespace(prefix).await;
        let guard = NamespaceGuard { ns: ns.clone() };
        let dirs = node.volumes(&ns, "queue", "example", replicas, "1Gi");
        prepare(&ns, &dirs);
        let op = if leader_election {
            node.operator_with(&ns, &format!("op-{prefix}-a"), &["--lease-namespace", &ns])
        } else {
            node.operator(&ns, &format!("op-{prefix}"))
        };
        node.apply(Some(&ns), &backupmx(primary, replicas, extra));
        let token = node.admin_token(&ns, "example").await;
        let mut pods = Vec::new();
        for i in 0..replicas {
            pods.push(
                node.ready_pod(&ns, &format!("example-{i}"), None, POD_TIMEOUT)
                    .await,
            );
        }
        println!(
            "[{prefix}] {replicas} pod(s) Ready on the node in {:.1?}: {:?}",
            started.elapsed(),
            pods.iter().map(|p| p.ip).collect::<Vec<_>>()
        );
        Setup {
            node,
            ns,
            op,
            token,
            pods,
            started,
            _guard: guard,
        }
    }

    pub fn done(&self, what: &str) {
        println!(
            "[{}] {what}: passed in {:.1?}",
            self.ns,
            self.started.elapsed()
        );
    }
}

impl Deployment for Setup {
    fn cluster(&self) -> &Cluster {
        &self.node.cluster
    }
    fn ns(&self) -> &str {
        &self.ns
    }
    fn operator(&self) -> &Operator {
        &self.op
    }
    fn smtp(&self, i: usize) -> SocketAddr {
        self.pods[i].smtp()
    }
    fn admin(&self, i: usize) -> Admin {
        self.pods[i].admin(&self.token)
    }

    /// `kill -9` of the container from the host; the kubelet restarts it in the same sandbox.
    async fn crash(&mut self, i: usize) {
        let pod = self.pods[i].clone();
        assert!(
            self.node.kill_container(&pod) > 0,
            "nothing killed in {}",
            pod.name
        );
        let restarted = self.node.wait_restarted(&pod).await;
        assert_eq!(restarted.ip, pod.ip, "the same sandbox: the same pod IP");
        self.pods[i] = restarted;
        let admin = self.admin(i);
        eventually("the restarted mx-pod answers", POD_TIMEOUT, || async {
            admin.try_get("/v1/queue").await.map(|_| ())
        })
        .await;
    }

    /// The real kubelet does the work: this only looks.
    async fn roll(&mut self, i: usize, _primary: &str) -> Rollout {
        let old = self.pods[i].clone();
        let pods: Api<Pod> = Api::namespaced(self.node.client().await, &self.ns);
        match pods.get_opt(&old.name).await {
            Ok(Some(p)) if p.metadata.uid.as_deref() == Some(old.uid.as_str()) => {
                if p.metadata.deletion_timestamp.is_some() {
                    Rollout::Terminating
                } else {
                    Rollout::Running
                }
            }
            // transient API errors: look again
            Err(_) => Rollout::Running,
            // gone, or a new incarnation
            Ok(_) => {
                self.pods[i] = self
                    .node
                    .ready_pod(&self.ns, &old.name, Some(&old.uid), POD_TIMEOUT)
                    .await;
                Rollout::Replaced
            }
        }
    }

    async fn removed(&mut self, i: usize) {
        let pod = &self.pods[i];
        self.node
            .pod_gone(&self.ns, &pod.name, &pod.uid, POD_TIMEOUT)
            .await;
    }
}
