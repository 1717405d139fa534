//! The operator against a real Kubernetes API server (v1.20.2 kube-apiserver + etcd +
//! kube-controller-manager, started once for this test binary by `tests/infra/kube/start.sh`),
//! driven with kubectl and kube-rs; where pods must run, the test plays the kubelet and a real
//! mx-pod listens on the pod's IP (127.0.0.0/8).
//! Every test has its own namespace and its own operator process (namespace scope), except the
//! leader election test, which runs two.

mod chart;
mod deletion;
mod dns;
mod dsn;
mod leader;
mod network_policy;
mod reconcile;
mod replay;
mod tls;
mod validation;
