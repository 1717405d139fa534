//! Harness for backupmx's integration tests: real components on 127.0.0.1.
//!
//! - [`MxPod`]: the real `mx-pod` binary in its own temp dir, driven over SMTP and its admin API
//!   ([`Admin`], the one admin client, also used for pods on the node).
//! - [`Primary`]: a real Postfix instance acting as a domain's primary
//!   (`tests/infra/postfix-primary.sh`), delivering into one maildir.
//! - [`Sink`]: Postfix's `smtp-sink`, optionally with fault injection or dumping each message.
//! - [`send`]: one message over [`realparts::Smtp`] (the one SMTP client), recording the exact
//!   reply, so tests know which messages were acknowledged with `250`.
//! - [`realparts`]: real rspamd and PowerDNS, swaks, an openssl certificate and the raw SMTP
//!   client (PROXY headers, arbitrary bytes).
//! - [`kube`] and [`node`]: the API-server tier and the real node; [`scenarios`]: the replay
//!   scenarios both run, written once.
//!
//! A missing component fails the test with the command that installs it (`make deps`); nothing
//! is skipped. Conditions are awaited with [`eventually`] (or [`wait_for`]), never with fixed
//! sleeps.

use std::{
    collections::HashMap,
    fs,
    io::Read,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant, SystemTime},
};

pub mod kube;
pub mod node;
pub mod realparts;
pub mod scenarios;
pub mod webhook;

use serde_json::Value;
use tokio::net::TcpStream;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Fails the test unless `cmd` is on PATH, saying how to install it.
pub fn require(cmd: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{cmd} is not installed: run `make deps` (as root) first"
    );
}

/// Fails the test unless it runs as root (Postfix and smtp-sink -u need it).
pub fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "these tests start Postfix and must run as root"
    );
}

/// The `mx-pod` binary, built once per test run.
/// Removes the variables `cargo test` sets for a test binary (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...) from a command that runs cargo: build scripts (ring's)
/// declare `rerun-if-env-changed` on some of them, so a nested `cargo build` would rebuild the
/// dependency tree, and the next build from a shell would rebuild it back.
pub fn clean_cargo_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

pub fn mxpod_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = clean_cargo_env(&mut Command::new(cargo))
            .current_dir(repo())
            .args(["build", "-q", "-p", "mx-pod", "--bin", "mx-pod"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building mx-pod failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join("target"));
        let bin = target.join("debug").join("mx-pod");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    free_port_on([127, 0, 0, 1].into())
}

/// A free TCP port on `ip`, for a server a test starts.
///
/// Taken below the kernel's ephemeral range (32768 and up by default) and below the ports the
/// shell scripts pick (20000-31999), from a counter shared by
/// the whole test process: a port handed out here is not handed out again, and outgoing
/// connections (which take ephemeral ports) cannot grab it between the check and the server's
/// own bind.
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // 12000-19999: below the shell scripts' picks (20000-31999) and the ephemeral range
    const LOW: u16 = 12_000;
    const SPAN: u16 = 8_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // each test binary starts at its own offset (several run one after the other)
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % u32::from(SPAN)) as u16 + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = LOW + n % SPAN;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on {ip} between {LOW} and {}", LOW + SPAN)
}

/// Polls `get` every 50 ms until it returns `Some`; fails the test after `timeout` with `what`.
/// The one wait helper of the harness ([`wait_for`] is its yes/no form).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = get().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for a condition: returns once `cond` holds.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually(what, timeout, || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
}

/// A fresh state directory under /tmp that non-root daemons (Postfix, smtp-sink) can reach.
pub fn state_dir(name: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("bmx-{name}-"))
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d
}

// === mx-pod ===

/// Writes an admin token file as an admin would: mode 600 (mx-pod refuses to start with a token
/// others may read).
pub fn write_token_file(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, format!("{token}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// How to configure an [`MxPod`].
#[derive(Clone)]
pub struct MxPodConfig {
    pub domains: Vec<(String, String)>,
    pub workers: usize,
    pub rate: u32,
    pub auto: bool,
    pub max_bytes: String,
    /// `smtp.max_message_size`.
    pub max_message_size: String,
    pub retention: String,
    pub delay_warning: String,
    pub dsn_relay: Option<String>,
    /// TOML appended to the `[dsn]` table (e.g. `tls_policy = "verify"`).
    pub dsn_extra: String,
    pub min_backoff: String,
    /// `replay.timeout`: connect, and the commands RFC 5321 sets no time for.
    pub replay_timeout: String,
    /// TOML appended to the `[replay]` table (e.g. `final_reply_timeout = "2s"`).
    pub replay_extra: String,
    /// Extra TOML appended to the `[queue]` table.
    pub queue_extra: String,
    /// Address the SMTP and admin listeners bind (a pod IP on 127.0.0.0/8 in the kube tier).
    pub ip: std::net::IpAddr,
    /// Admin API port (a free one when unset).
    pub admin_port: Option<u16>,
    /// SMTP port (a free one when unset).
    pub smtp_port: Option<u16>,
    /// `smtp.listen` when not just `ip:smtp_port` (e.g. both wildcards on that port).
    pub smtp_listen: Vec<SocketAddr>,
    /// Admin bearer token (a generated one when unset).
    pub token: Option<String>,
    /// TOML appended to the `[smtp]` table. By default the per-client limits are off: the
    /// tests' load all comes from one loopback address.
    pub smtp_extra: String,
    /// TOML tables put before the `[[domains]]` entries (e.g. `[filter]`).
    pub extra: String,
    /// TOML appended to every `[[domains]]` entry (e.g. `recipients = { mode = "verify" }`).
    pub domain_extra: String,
}

impl MxPodConfig {
    /// One domain `example.test` whose primary is `primary`.
    pub fn new(primary: &str) -> Self {
        MxPodConfig {
            domains: vec![("example.test".into(), primary.into())],
            workers: 0,
            rate: 0,
            auto: false,
            max_bytes: "1GiB".into(),
            max_message_size: "1MiB".into(),
            retention: "5d".into(),
            delay_warning: "4h".into(),
            dsn_relay: None,
            dsn_extra: String::new(),
            min_backoff: "200ms".into(),
            replay_timeout: "10s".into(),
            replay_extra: String::new(),
            queue_extra: String::new(),
            ip: [127, 0, 0, 1].into(),
            admin_port: None,
            smtp_port: None,
            smtp_listen: Vec::new(),
            token: None,
            smtp_extra: "max_connections_per_ip = 1000\nmax_messages_per_minute = 0\nmax_recipients_per_minute = 0\n".into(),
            extra: String::new(),
            domain_extra: String::new(),
        }
    }
}

/// A running (or stopped) mx-pod process with its own queue directory.
pub struct MxPod {
    pub dir: tempfile::TempDir,
    pub queue_dir: PathBuf,
    pub config_path: PathBuf,
    pub smtp: SocketAddr,
    /// The admin API's base URL (`http://IP:PORT`) and bearer token.
    pub admin: String,
    pub token: String,
    child: Option<Child>,
    log: PathBuf,
    /// Its admin API client: `pod.queued()`, `pod.get(..)` and the rest come from here.
    api: Admin,
}

impl std::ops::Deref for MxPod {
    type Target = Admin;
    fn deref(&self) -> &Admin {
        &self.api
    }
}

impl MxPod {
    /// Writes the configuration and starts the server; returns once `/readyz` says ready.
    pub async fn start(cfg: MxPodConfig) -> MxPod {
        let dir = state_dir("mxpod");
        Self::start_in(dir, cfg).await
    }

    /// Like [`MxPod::start`] with a given directory (the queue lives in `DIR/queue`).
    pub async fn start_in(dir: tempfile::TempDir, cfg: MxPodConfig) -> MxPod {
        let queue_dir = dir.path().join("queue");
        Self::start_with_queue_dir(dir, queue_dir, cfg).await
    }

    /// Like [`MxPod::start`] with the queue in `queue_dir` (e.g. a small filesystem).
    pub async fn start_with_queue_dir(
        dir: tempfile::TempDir,
        queue_dir: PathBuf,
        cfg: MxPodConfig,
    ) -> MxPod {
        let smtp = SocketAddr::new(
            cfg.ip,
            cfg.smtp_port.unwrap_or_else(|| free_port_on(cfg.ip)),
        );
        let admin = SocketAddr::new(
            cfg.ip,
            cfg.admin_port.unwrap_or_else(|| free_port_on(cfg.ip)),
        );
        let token = cfg
            .token
            .clone()
            .unwrap_or_else(|| format!("tok-{}", std::process::id()));
        write_token_file(&dir.path().join("admin-token"), &token);
        let listen: Vec<String> = if cfg.smtp_listen.is_empty() {
            vec![format!("\"{smtp}\"")]
        } else {
            cfg.smtp_listen.iter().map(|a| format!("\"{a}\"")).collect()
        };
        let listen = listen.join(", ");
        let mut toml = format!(
            "hostname = \"mx2.example.test\"\n\n[smtp]\nlisten = [{listen}]\nmax_message_size = \"{}\"\nshutdown_grace = \"20s\"\n{}\n[queue]\ndir = \"{}\"\nretention = \"{}\"\ndelay_warning = \"{}\"\nmax_bytes = \"{}\"\n{}\n\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"{}\"\n\n[replay]\nworkers = {}\nauto = {}\nrate_per_second = {}\nprobe_interval = \"200ms\"\ntimeout = \"{}\"\nmin_backoff = \"{}\"\nmax_backoff = \"2s\"\n{}\n",
            cfg.max_message_size,
            cfg.smtp_extra,
            queue_dir.display(),
            cfg.retention,
            cfg.delay_warning,
            cfg.max_bytes,
            cfg.queue_extra,
            dir.path().join("admin-token").display(),
            cfg.workers,
            cfg.auto,
            cfg.rate,
            cfg.replay_timeout,
            cfg.min_backoff,
            cfg.replay_extra,
        );
        if cfg.dsn_relay.is_some() || !cfg.dsn_extra.is_empty() {
            toml.push_str("\n[dsn]\n");
            if let Some(relay) = &cfg.dsn_relay {
                toml.push_str(&format!("relay = \"{relay}\"\n"));
            }
            toml.push_str(&cfg.dsn_extra);
        }
        toml.push('\n');
        toml.push_str(&cfg.extra);
        for (name, primary) in &cfg.domains {
            toml.push_str(&format!(
                "\n[[domains]]\nname = \"{name}\"\nprimary = \"{primary}\"\n{}\n",
                cfg.domain_extra
            ));
        }
        Self::launch(dir, queue_dir, &toml, smtp, admin, &token).await
    }

    /// Plays a pod with the operator's rendered `mx-pod.toml` (from its ConfigMap): only what
    /// the kubelet and the pod network decide changes. SMTP and the admin API listen on the pod
    /// IP `ip` (the rendered ports), the queue and the token file are paths on this host; every
    /// other setting (replay, DSN relay, TLS policies, filters) is the operator's. `ca_pem` is
    /// what the kubelet would mount from `spec.caBundle`'s Secret at `trust.ca_file`.
    pub async fn start_rendered(
        rendered: &str,
        ip: std::net::IpAddr,
        token: &str,
        ca_pem: Option<&str>,
    ) -> MxPod {
        let mut config =
            mx_pod::config::Config::parse(rendered, "the rendered ConfigMap").expect("valid");
        let dir = state_dir("mxpod");
        let queue_dir = dir.path().join("queue");
        let token_file = dir.path().join("admin-token");
        write_token_file(&token_file, token);
        let port = |a: &SocketAddr| a.port();
        let smtp = SocketAddr::new(ip, port(&config.smtp.listen[0]));
        let admin = SocketAddr::new(ip, port(&config.admin.listen));
        config.smtp.listen = vec![smtp];
        config.admin.listen = admin;
        config.admin.token_file = Some(token_file);
        config.queue.dir = queue_dir.clone();
        match (&config.trust.ca_file, ca_pem) {
            (Some(_), Some(pem)) => {
                let file = dir.path().join("ca.crt");
                fs::write(&file, pem).unwrap();
                config.trust.ca_file = Some(file);
            }
            (None, None) => {}
            (rendered, given) => panic!(
                "the rendered trust.ca_file is {rendered:?} but the test gives {:?} CA",
                given.map(|_| "a")
            ),
        }
        Self::launch(dir, queue_dir, &config.to_toml(), smtp, admin, token).await
    }

    /// Writes `config` to `DIR/mx-pod.toml` and runs mx-pod on it; waits until ready.
    async fn launch(
        dir: tempfile::TempDir,
        queue_dir: PathBuf,
        config: &str,
        smtp: SocketAddr,
        admin: SocketAddr,
        token: &str,
    ) -> MxPod {
        let config_path = dir.path().join("mx-pod.toml");
        fs::write(&config_path, config).unwrap();
        let mut pod = MxPod {
            queue_dir,
            config_path,
            smtp,
            admin: format!("http://{admin}"),
            api: Admin::new(
                format!("http://{admin}"),
                token,
                mx_pod::trust::Trust::webpki().client(),
            ),
            token: token.to_owned(),
            child: None,
            log: dir.path().join("mx-pod.log"),
            dir,
        };
        pod.restart().await;
        pod
    }

    /// Starts the process again on the same configuration and queue; waits until ready.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(mxpod_bin())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn mx-pod");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.ready().await {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "mx-pod exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mx-pod not ready after 30 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn ready(&self) -> bool {
        matches!(self.api.http.get(format!("{}/readyz", self.admin)).send().await, Ok(r) if r.status().is_success())
    }

    /// The process' log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        let pid = self.pid().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => false,
            Some(_) => {
                self.child = None;
                true
            }
            None => true,
        }
    }

    /// Waits for the process to exit (after [`MxPod::sigterm`]).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "mx-pod did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`MxPod::cli`] of `args` against this pod's config file (`--config` added).
    pub fn cli_config(&self, args: &[&str]) -> (bool, String) {
        let cfg = self.config_path.display().to_string();
        let mut all = args.to_vec();
        all.extend(["--config", &cfg]);
        self.cli(&all)
    }

    /// Runs `mx-pod` with arguments (a CLI subcommand); returns exit status and stdout+stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(mxpod_bin())
            .args(args)
            .output()
            .expect("run mx-pod");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

impl Drop for MxPod {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A client of mx-pod's admin API (a process here, or a pod on the node): the harness' one
/// admin client.
pub struct Admin {
    pub base: String,
    token: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: String, token: &str, http: reqwest::Client) -> Admin {
        Admin {
            base,
            token: token.to_owned(),
            http,
        }
    }

    /// GET a path with the token: status and JSON (or text); None when nothing answers.
    pub async fn try_get(&self, path: &str) -> Option<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        Some(json_of(r).await)
    }

    /// GET a path that must answer 200.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (code, v) = self.get(path).await;
        assert_eq!(code, 200, "GET {}{path}: {v}", self.base);
        v
    }

    /// GET an admin path with the bearer token; panics on transport errors, returns status
    /// and JSON (or text).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, true).await
    }

    /// A mutating call with the bearer token (or without, when `token` is false).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: bool,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if token {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        json_of(req.send().await.expect("admin API reachable")).await
    }

    /// Sets the replay workers and rate.
    pub async fn set_replay(&self, workers: usize, rate: u32) {
        let (code, body) = self
            .call(
                reqwest::Method::PUT,
                "/v1/replay",
                Some(serde_json::json!({"workers": workers, "rate_per_second": rate})),
                true,
            )
            .await;
        assert_eq!(code, 200, "PUT /v1/replay: {body}");
    }

    /// The value of one series of `/metrics`, `name{labels}` exactly as rendered, e.g.
    /// `mxpod_delivered_messages_total{domain="example.test",tls="yes"}`; fails the test when
    /// the series is not there.
    pub async fn metric(&self, series: &str) -> f64 {
        let (code, body) = self.get("/metrics").await;
        assert_eq!(code, 200, "GET /metrics: {body}");
        let text = body.as_str().expect("metrics are text").to_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{series}: {e}"))
    }

    /// `GET /v1/replay`'s route entry for `domain`.
    pub async fn route(&self, domain: &str) -> Value {
        let (code, r) = self.get("/v1/replay").await;
        assert_eq!(code, 200, "{r}");
        r["routes"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["route"] == domain).cloned())
            .unwrap_or_else(|| panic!("no route {domain} in {r}"))
    }

    /// Messages in the queue (all routes, DSNs included).
    pub async fn queued(&self) -> u64 {
        let (code, v) = self.get("/v1/queue").await;
        assert_eq!(code, 200, "{v}");
        v["messages"].as_u64().expect("messages")
    }

    /// The current replay workers.
    pub async fn workers(&self) -> u64 {
        self.get_ok("/v1/replay").await["workers"]
            .as_u64()
            .expect("workers")
    }

    /// Waits until the queue is empty (while the API does not answer, it is not).
    pub async fn wait_empty(&self, timeout: Duration) {
        wait_for(
            &format!("the queue of {} to empty", self.base),
            timeout,
            || async {
                self.try_get("/v1/queue")
                    .await
                    .is_some_and(|(_, q)| q["messages"] == 0)
            },
        )
        .await;
    }
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

// === Postfix primary ===

/// A real Postfix acting as the primary MX of `example.test` (or of the domains given to
/// [`Primary::start_for`]), delivering to one maildir.
pub struct Primary {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The domains it takes mail for (`virtual_mailbox_domains`).
    domains: Vec<String>,
    running: bool,
}

impl Primary {
    pub fn start() -> Primary {
        Self::start_on(free_port())
    }

    /// Starts a primary on a given port (e.g. one a faulty server held before).
    pub fn start_on(port: u16) -> Primary {
        Self::start_with(port, &["example.test"])
    }

    /// Starts a primary for these domains. Postfix matches a domain in its tables as spelled
    /// (no IDNA mapping), so a primary of an IDN lists its U-label and its A-label, as a real
    /// one that takes SMTPUTF8 mail must.
    pub fn start_for(domains: &[&str]) -> Primary {
        Self::start_with(free_port(), domains)
    }

    fn start_with(port: u16, domains: &[&str]) -> Primary {
        require_root();
        require("postfix");
        let mut p = Primary {
            dir: state_dir("primary"),
            port,
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            running: false,
        };
        p.up();
        p
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, args: &[&str]) {
        let out = Command::new("bash")
            .arg(repo().join("tests/infra/postfix-primary.sh"))
            .args(args)
            .output()
            .expect("run postfix-primary.sh");
        assert!(
            out.status.success(),
            "postfix-primary.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (or restarts) Postfix; returns once the port accepts.
    pub fn up(&mut self) {
        let dir = self.dir.path().to_str().unwrap().to_owned();
        let port = self.port.to_string();
        let mut args = vec!["start", &dir, &port];
        args.extend(self.domains.iter().map(String::as_str));
        self.script(&args);
        self.running = true;
    }

    /// Stops Postfix (a primary outage); the maildir is kept.
    pub fn down(&mut self) {
        let dir = self.dir.path().to_str().unwrap().to_owned();
        self.script(&["stop", &dir]);
        self.running = false;
    }

    /// Sets main.cf parameters (`name=value`) and reloads Postfix: new sessions see them.
    pub fn reconfigure(&self, settings: &[String]) {
        let etc = self.dir.path().join("etc");
        let out = Command::new("postconf")
            .arg("-c")
            .arg(&etc)
            .arg("-e")
            .args(settings)
            .output()
            .expect("run postconf");
        assert!(
            out.status.success(),
            "postconf {settings:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // backdated, as tests/infra/postfix-lib.sh does: Postfix re-reads a main.cf younger
        // than ~2 s over and over
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        let main_cf = fs::File::options()
            .write(true)
            .open(etc.join("main.cf"))
            .unwrap();
        main_cf.set_modified(old).unwrap();
        let out = Command::new("postfix")
            .arg("-c")
            .arg(&etc)
            .arg("reload")
            .output()
            .expect("run postfix reload");
        assert!(
            out.status.success(),
            "postfix reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Turns STARTTLS on with `cert_file`/`key_file` (PEM) at `smtpd_tls_security_level =
    /// level` (`may`, or `encrypt`: no mail without TLS), with TLS sessions logged and named in
    /// the `Received:` header ("using TLS"); returns once new sessions offer STARTTLS.
    pub async fn enable_tls(&self, cert_file: &Path, key_file: &Path, level: &str) {
        self.reconfigure(&[
            format!("smtpd_tls_security_level={level}"),
            format!("smtpd_tls_cert_file={}", cert_file.display()),
            format!("smtpd_tls_key_file={}", key_file.display()),
            "smtpd_tls_loglevel=1".into(),
            "smtpd_tls_received_header=yes".into(),
        ]);
        let addr = self.addr();
        wait_for(
            "the primary to offer STARTTLS",
            Duration::from_secs(30),
            || async {
                let c = mx_pod::outbound::SmtpClient::connect(
                    &addr,
                    "probe.example.test",
                    Duration::from_secs(5),
                )
                .await;
                match c {
                    Ok(c) => {
                        let offered = c.caps.starttls;
                        c.quit().await;
                        offered
                    }
                    Err(_) => false,
                }
            },
        )
        .await;
    }

    /// Postfix's log so far.
    pub fn maillog(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The delivered messages (maildir `new/` and `cur/`), contents.
    pub fn delivered(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let d = self.dir.path().join("mail/inbox").join(sub);
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let mut buf = Vec::new();
                if fs::File::open(e.path())
                    .and_then(|mut f| f.read_to_end(&mut buf))
                    .is_ok()
                {
                    out.push(buf);
                }
            }
        }
        out
    }

    /// Message-IDs in the order Postfix committed them: its maillog's `END-OF-MESSAGE` lines
    /// (logged at each message's final dot, before the `250`), each queue ID named by its
    /// cleanup `message-id=` line. A message whose sender hung up before the dot is not in it.
    pub fn received_order(&self) -> Vec<String> {
        // cleanup may log a message's message-id a moment after smtpd's END-OF-MESSAGE
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default();
            match commit_order(&log) {
                Ok(order) => return order,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The Message-IDs of a Postfix maillog in commit order (see [`Primary::received_order`]);
/// `Err` names a committed queue ID whose `message-id=` line is not (yet) in the log.
pub fn commit_order(log: &str) -> Result<Vec<String>, String> {
    // "... cleanup[7]: QUEUEID: message-id=<id>" and "... smtpd[8]: QUEUEID: info: END-OF-MESSAGE"
    let queue_id = |l: &str, after: &str| -> Option<String> {
        let rest = l.split_once(after)?.1;
        Some(rest.split_once(": ")?.0.to_owned())
    };
    let names: HashMap<String, String> = log
        .lines()
        .filter(|l| l.contains("cleanup[") && l.contains("message-id=<"))
        .filter_map(|l| {
            let id = l.split("message-id=<").nth(1)?.split('>').next()?;
            Some((queue_id(l, "]: ")?, id.to_owned()))
        })
        .collect();
    log.lines()
        .filter(|l| l.contains("smtpd[") && l.contains(": info: END-OF-MESSAGE from "))
        .map(|l| {
            let qid = queue_id(l, "]: ").unwrap_or_default();
            names
                .get(&qid)
                .cloned()
                .ok_or_else(|| format!("queue ID {qid} has no message-id line: {l}"))
        })
        .collect()
}

impl Drop for Primary {
    fn drop(&mut self) {
        if self.running {
            let dir = self.dir.path().to_str().unwrap().to_owned();
            let _ = Command::new("bash")
                .arg(repo().join("tests/infra/postfix-primary.sh"))
                .args(["stop", &dir])
                .output();
        }
    }
}

// === smtp-sink ===

/// Postfix's `smtp-sink` on a port, with optional fault options and message dumps.
pub struct Sink {
    pub port: u16,
    child: Child,
    pub dump: Option<tempfile::TempDir>,
}

impl Sink {
    /// Starts `smtp-sink -u nobody OPTIONS 127.0.0.1:PORT 256` on `port` (0 = a free one).
    pub async fn start(options: &[&str], port: u16, dump: bool) -> Sink {
        require_root();
        require("smtp-sink");
        let port = if port == 0 { free_port() } else { port };
        let dump_dir = dump.then(|| {
            let d = state_dir("sink");
            fs::set_permissions(
                d.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o777),
            )
            .unwrap();
            d
        });
        let mut cmd = Command::new("smtp-sink");
        cmd.args(["-u", "nobody"]).args(options);
        if let Some(d) = &dump_dir {
            cmd.arg("-d").arg(format!("{}/%H%M%S.", d.path().display()));
        }
        cmd.arg(format!("127.0.0.1:{port}")).arg("256");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn smtp-sink");
        wait_for(
            "smtp-sink to listen",
            Duration::from_secs(10),
            || async move { TcpStream::connect(("127.0.0.1", port)).await.is_ok() },
        )
        .await;
        Sink {
            port,
            child,
            dump: dump_dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The dumped messages with their file modification times, oldest first.
    pub fn dumped(&self) -> Vec<(SystemTime, Vec<u8>)> {
        let d = self.dump.as_ref().expect("started with dump");
        let mut out: Vec<(SystemTime, Vec<u8>)> = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?.modified().ok()?;
                Some((m, fs::read(e.path()).ok()?))
            })
            .collect();
        out.sort_by_key(|(t, _)| *t);
        out
    }

    /// Waits until the alert emails for `object` (`ns/name`) with the subjects `reasons` have
    /// reached this sink (started with dump), then checks that each came exactly once, to `to`.
    pub async fn expect_alert_mails(&self, object: &str, to: &str, reasons: &[&str]) {
        let mails = |reason: &str| -> Vec<String> {
            let subject = format!("Subject: [backupmx {object}] {reason}");
            self.dumped()
                .into_iter()
                .map(|(_, m)| String::from_utf8_lossy(&m).into_owned())
                .filter(|m| m.lines().any(|l| l == subject))
                .collect()
        };
        wait_for(
            &format!("the alert emails {reasons:?} at the relay"),
            Duration::from_secs(60),
            || async { reasons.iter().all(|r| !mails(r).is_empty()) },
        )
        .await;
        for reason in reasons {
            let got = mails(reason);
            assert_eq!(got.len(), 1, "one {reason} email: {got:?}");
            assert!(
                got[0]
                    .lines()
                    .any(|l| l.starts_with("To:") && l.contains(to)),
                "{reason} email to {to}: {}",
                got[0]
            );
        }
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === SMTP sending ===

/// A test message with a unique Message-ID `<tag.seq@test>` and an `X-Seq` header.
pub fn message(tag: &str, seq: usize, body_bytes: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Sender <sender@sender.test>\r\nTo: <user@example.test>\r\nSubject: {tag} {seq:05}\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}.{seq}@test>\r\nX-Seq: {seq}\r\n\r\n"
    )
    .into_bytes();
    let line = format!("{tag} {seq:05} line of filler text for the body .......\r\n");
    while m.len() < body_bytes {
        m.extend_from_slice(line.as_bytes());
    }
    m.extend_from_slice(b".leading dot stays intact\r\n");
    m
}

/// The outcome of one SMTP transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The reply to the end of DATA (or the first refusal), e.g. `250 2.0.0 Ok: queued as X`.
    pub reply: String,
}

impl Sent {
    pub fn ok(&self) -> bool {
        self.reply.starts_with("250")
    }
    pub fn code(&self) -> u16 {
        self.reply
            .get(..3)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }
}

/// Sends `message(tag, i, size)` for every `i` in `seqs` from `from` to `user@example.test`;
/// each must be accepted (`250`). Returns their Message-IDs (`TAG.SEQ@test`) in sending order.
pub async fn send_all(
    addr: SocketAddr,
    from: &str,
    tag: &str,
    seqs: std::ops::Range<usize>,
    size: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in seqs {
        let r = send(addr, from, &["user@example.test"], &message(tag, i, size))
            .await
            .unwrap_or_else(|e| panic!("{tag}.{i} to {addr}: {e}"));
        assert!(r.ok(), "{tag}.{i}: {r:?}");
        ids.push(format!("{tag}.{i}@test"));
    }
    ids
}

/// [`send_all`] of `n` small messages from `sender@sender.test`.
pub async fn send_n(addr: SocketAddr, tag: &str, n: usize) -> Vec<String> {
    send_all(addr, "sender@sender.test", tag, 0..n, 300).await
}

/// Sends one message over a fresh connection; `Err` when the connection failed (no reply to
/// the end of DATA was read: the message must be considered not accepted).
pub async fn send(addr: SocketAddr, from: &str, to: &[&str], data: &[u8]) -> std::io::Result<Sent> {
    let to: Vec<(&str, &str)> = to.iter().map(|t| (*t, "")).collect();
    send_with_params(addr, from, &to, data).await
}

/// Like [`send`], each recipient with ESMTP parameters as a sending MTA gives them
/// (`("u@example.test", "NOTIFY=FAILURE ORCPT=rfc822;u@example.test")`).
pub async fn send_with_params(
    addr: SocketAddr,
    from: &str,
    to: &[(&str, &str)],
    data: &[u8],
) -> std::io::Result<Sent> {
    let step = async {
        let mut c = realparts::Smtp::open(addr, b"").await?;
        if !c.greeting.starts_with("220") {
            return Ok(Sent { reply: c.greeting });
        }
        let mut cmds = vec!["EHLO client.test".to_owned(), format!("MAIL FROM:<{from}>")];
        cmds.extend(to.iter().map(|(t, params)| {
            if params.is_empty() {
                format!("RCPT TO:<{t}>")
            } else {
                format!("RCPT TO:<{t}> {params}")
            }
        }));
        cmds.push("DATA".into());
        for cmd in cmds {
            let reply = c.try_cmd(&cmd).await?;
            let ok = if cmd == "DATA" {
                reply.starts_with("354")
            } else {
                reply.starts_with("250")
            };
            if !ok {
                let _ = c.try_write(b"QUIT\r\n").await;
                return Ok(Sent { reply });
            }
        }
        c.try_write(&realparts::dot_stuffed(data)).await?;
        let reply = c.try_reply().await?;
        let _ = c.try_write(b"QUIT\r\n").await;
        Ok(Sent { reply })
    };
    tokio::time::timeout(Duration::from_secs(30), step)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "SMTP exchange"))?
}

/// The Message-IDs of [`message`]s tagged `tag` (`TAG.SEQ@test`) among `ids`, in their order.
pub fn with_tag(ids: &[String], tag: &str) -> Vec<String> {
    let prefix = format!("{tag}.");
    ids.iter()
        .filter(|id| id.starts_with(&prefix))
        .cloned()
        .collect()
}

/// `X-Seq` of a delivered message, if any.
pub fn seq_of(msg: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(msg);
    text.lines()
        .find_map(|l| l.strip_prefix("X-Seq: "))
        .and_then(|s| s.trim().parse().ok())
}

/// Normalizes CRLF to LF (Postfix stores maildir files with LF).
pub fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Runs a command, returning (success, stdout+stderr).
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    require(cmd);
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}
