//! Real filter components for the integration tests: rspamd and PowerDNS (started by
//! `tests/infra/rspamd.sh` / `powerdns.sh`, one instance per test, on free ports of 127.0.0.1),
//! swaks runs, a self-signed certificate made with the `openssl` CLI, and a raw SMTP client that
//! can present a PROXY header and send arbitrary bytes (for smuggling and relay tricks).
//!
//! A missing component fails the test with a hint to run `make deps`; nothing is skipped. Every
//! daemon is stopped by its wrapper's `Drop` (also when the test panics).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use crate::{MxPod, Sink, repo, require, require_root, run, state_dir, wait_for};

/// Fails the test unless `path` exists (a file a package installs), saying how to get it.
fn require_file(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing ({package} is not installed): run `make deps` (as root) first"
    );
}

/// Runs `tests/infra/SCRIPT ACTION DIR` with `env`; returns the `KEY=VALUE` lines it printed.
pub fn infra(
    script: &str,
    action: &str,
    dir: &Path,
    env: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("tests/infra").join(script))
        .arg(action)
        .arg(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run tests/infra/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tests/infra/{script} {action} {} failed ({}); is everything installed (`make deps`)?\nstdout:\n{stdout}\nstderr:\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn env_value(env: &HashMap<String, String>, key: &str, script: &str) -> String {
    env.get(key)
        .unwrap_or_else(|| panic!("tests/infra/{script} did not print {key}: {env:?}"))
        .clone()
}

// === rspamd ===

/// A real rspamd (`tests/infra/rspamd.sh`) in its own directory; stopped on drop.
pub struct Rspamd {
    /// The normal worker, e.g. `http://127.0.0.1:PORT` (what `filter.rspamd.url` names).
    pub url: String,
    pub controller_url: String,
    pub dir: tempfile::TempDir,
    running: bool,
}

impl Rspamd {
    /// Starts rspamd with the dead default resolver (every DNS check fails within 0.2 s).
    pub fn start() -> Rspamd {
        Self::start_with_dns(None)
    }

    /// Starts rspamd asking `dns` (`ip:port`, e.g. a [`PowerDns`]) for its DNS checks. With a
    /// server that answers REFUSED, a plain message from an outside address scores ~7 ("add
    /// header"); from 127.0.0.1 ~0.9 ("no action").
    pub fn start_with_dns(dns: Option<&str>) -> Rspamd {
        Self::start_with_env(dns.map(|d| ("RSPAMD_DNS", d)).into_iter().collect())
    }

    /// Starts rspamd whose normal worker also listens on `ip` (same port as [`Rspamd::url`]),
    /// e.g. the real node's bridge gateway where pods reach the host; returns it and that URL.
    pub fn start_also_on(ip: std::net::Ipv4Addr) -> (Rspamd, String) {
        let ip = ip.to_string();
        let r = Self::start_with_env(vec![("RSPAMD_EXTRA_BIND", &ip)]);
        let port = r
            .url
            .rsplit(':')
            .next()
            .expect("port in RSPAMD_URL")
            .to_owned();
        let url = format!("http://{ip}:{port}");
        (r, url)
    }

    fn start_with_env(env: Vec<(&str, &str)>) -> Rspamd {
        require_root();
        require("rspamd");
        let dir = state_dir("rspamd");
        let out = infra("rspamd.sh", "start", dir.path(), &env);
        Rspamd {
            url: env_value(&out, "RSPAMD_URL", "rspamd.sh"),
            controller_url: env_value(&out, "RSPAMD_CONTROLLER_URL", "rspamd.sh"),
            dir,
            running: true,
        }
    }

    /// Stops rspamd (an outage); the wrapper may be started again with [`Rspamd::restart`].
    pub fn stop(&mut self) {
        infra("rspamd.sh", "stop", self.dir.path(), &[]);
        self.running = false;
    }

    /// Starts it again in the same directory (same ports when still free).
    pub fn restart(&mut self) {
        let out = infra("rspamd.sh", "start", self.dir.path(), &[]);
        self.url = env_value(&out, "RSPAMD_URL", "rspamd.sh");
        self.running = true;
    }

    /// Asks rspamd directly (`POST /checkv2` with `IP:`): its JSON answer.
    pub async fn check(&self, ip: &str, message: &[u8]) -> Value {
        let r = mx_pod::trust::Trust::webpki()
            .client()
            .post(format!("{}/checkv2", self.url))
            .header("IP", ip)
            .body(message.to_vec())
            .send()
            .await
            .expect("rspamd reachable");
        r.json().await.expect("rspamd answers JSON")
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("bash")
                .arg(repo().join("tests/infra/rspamd.sh"))
                .arg("stop")
                .arg(self.dir.path())
                .output();
        }
    }
}

// === PowerDNS ===

/// A real PowerDNS authoritative server (`tests/infra/powerdns.sh`) with its HTTP API; stopped
/// on drop. No zone exists at first; names outside every zone get REFUSED.
pub struct PowerDns {
    pub api_url: String,
    pub api_key: String,
    pub server_id: String,
    /// `127.0.0.1:PORT`, UDP and TCP.
    pub dns: String,
    pub dir: tempfile::TempDir,
    running: bool,
    http: reqwest::Client,
}

/// `name` with exactly one trailing dot.
fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

impl PowerDns {
    pub fn start() -> PowerDns {
        require_root();
        require("pdns_server");
        require("sqlite3");
        require_file(
            "/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql",
            "pdns-backend-sqlite3",
        );
        let dir = state_dir("pdns");
        let out = infra("powerdns.sh", "start", dir.path(), &[]);
        PowerDns {
            api_url: env_value(&out, "PDNS_API_URL", "powerdns.sh"),
            api_key: env_value(&out, "PDNS_API_KEY", "powerdns.sh"),
            server_id: env_value(&out, "PDNS_SERVER_ID", "powerdns.sh"),
            dns: env_value(&out, "PDNS_DNS", "powerdns.sh"),
            dir,
            running: true,
            http: mx_pod::trust::Trust::webpki().client(),
        }
    }

    /// Sets example.test's MX RRset to the primary's record alone (`10 mail.example.test.`).
    pub async fn primary_mx_only(&self) {
        let mx = ["10 mail.example.test."];
        self.set_records("example.test", "example.test", "MX", 300, &mx)
            .await;
    }

    /// A PowerDNS serving `example.test` with the primary's records only: MX
    /// `10 mail.example.test.` and `mail.example.test A 192.0.2.10`.
    pub async fn with_example_test() -> PowerDns {
        let pdns = Self::start();
        pdns.create_zone("example.test").await;
        pdns.primary_mx_only().await;
        pdns.set_records(
            "example.test",
            "mail.example.test",
            "A",
            300,
            &["192.0.2.10"],
        )
        .await;
        pdns
    }

    /// Asserts that [`PowerDns::with_example_test`]'s zone holds the primary's records and
    /// nothing of the backup's (its MX, its address, the ownership TXT).
    pub fn assert_only_primary_records(&self) {
        assert_eq!(self.dig("example.test", "MX"), "10 mail.example.test.");
        assert_eq!(self.dig("mx2.example.test", "A"), "");
        assert_eq!(self.dig("_backupmx.example.test", "TXT"), "");
        assert_eq!(
            self.dig("mail.example.test", "A"),
            "192.0.2.10",
            "the primary's records stay"
        );
    }

    /// A BackupMx `spec.dns` publishing in `zone` on this server, its API key in the Secret
    /// `dns-credentials` (see [`PowerDns::credentials_secret`]), verified at its DNS address.
    pub fn backupmx_dns(&self, zone: &str) -> Value {
        self.backupmx_dns_via(zone, &self.api_url)
    }

    /// [`PowerDns::backupmx_dns`] reaching the API at `api_url` (e.g. the `https://` URL of
    /// [`PowerDns::api_behind_tls`]).
    pub fn backupmx_dns_via(&self, zone: &str, api_url: &str) -> Value {
        serde_json::json!({
            "provider": "powerdns", "zone": zone,
            "credentialsSecretRef": {"name": "dns-credentials"},
            "powerdns": {"url": api_url, "serverId": self.server_id},
            "nameservers": [self.dns_addr()],
        })
    }

    /// Puts the API behind a TLS front presenting `leaf` (issue it for `127.0.0.1`), as a
    /// reverse proxy does in production (PowerDNS's own API speaks plain HTTP); the front's
    /// `url()` is the `https://` base to give the operator. Runs until the test's runtime ends.
    pub async fn api_behind_tls(&self, leaf: &testkit::Leaf) -> testkit::TlsFront {
        let backend: SocketAddr = self
            .api_url
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("PowerDNS API URL {:?} is not http://IP:PORT", self.api_url));
        testkit::TlsFront::start(backend, leaf).await
    }

    /// The Secret `dns-credentials` with this server's API key (`apiKey`).
    pub fn credentials_secret(&self) -> Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "dns-credentials"},
                           "stringData": {"apiKey": self.api_key}})
    }

    /// The DNS address, `127.0.0.1:PORT` (what `filter.resolver` names).
    pub fn dns_addr(&self) -> String {
        self.dns.clone()
    }

    fn zones_url(&self) -> String {
        format!("{}/api/v1/servers/{}/zones", self.api_url, self.server_id)
    }

    async fn api(&self, method: reqwest::Method, url: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .request(method.clone(), url)
            .header("X-API-Key", &self.api_key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PowerDNS API {method} {url}: {e}"));
        let code = r.status().as_u16();
        (code, r.text().await.unwrap_or_default())
    }

    /// Creates a native zone (`bl.test`) with an NS record.
    pub async fn create_zone(&self, zone: &str) {
        let zone = fqdn(zone);
        let (code, body) = self
            .api(
                reqwest::Method::POST,
                &self.zones_url(),
                json!({"name": zone, "kind": "Native", "nameservers": [format!("ns1.{zone}")]}),
            )
            .await;
        assert_eq!(code, 201, "PowerDNS: create zone {zone}: {body}");
    }

    async fn patch(&self, zone: &str, rrset: Value) {
        let zone = fqdn(zone);
        let (code, body) = self
            .api(
                reqwest::Method::PATCH,
                &format!("{}/{zone}", self.zones_url()),
                json!({ "rrsets": [rrset] }),
            )
            .await;
        assert_eq!(code, 204, "PowerDNS: PATCH zone {zone}: {body}");
    }

    /// Sets (replaces) the records of type `rtype` at `name` in `zone`. `contents` are in zone
    /// file form (a TXT value with its quotes: see [`PowerDns::set_txt`]).
    pub async fn set_records(
        &self,
        zone: &str,
        name: &str,
        rtype: &str,
        ttl: u32,
        contents: &[&str],
    ) {
        let records: Vec<Value> = contents
            .iter()
            .map(|c| json!({"content": c, "disabled": false}))
            .collect();
        self.patch(
            zone,
            json!({"name": fqdn(name), "type": rtype, "ttl": ttl, "changetype": "REPLACE", "records": records}),
        )
        .await;
    }

    /// Sets one TXT record (quoted for PowerDNS).
    pub async fn set_txt(&self, zone: &str, name: &str, ttl: u32, text: &str) {
        let quoted = format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
        self.set_records(zone, name, "TXT", ttl, &[&quoted]).await;
    }

    /// Deletes the records of type `rtype` at `name`.
    pub async fn delete_records(&self, zone: &str, name: &str, rtype: &str) {
        self.patch(
            zone,
            json!({"name": fqdn(name), "type": rtype, "changetype": "DELETE"}),
        )
        .await;
    }

    /// What the server answers now (`dig +short`), bypassing any resolver cache.
    pub fn dig(&self, name: &str, rtype: &str) -> String {
        let (ip, port) = self.dns.rsplit_once(':').expect("ip:port");
        let (ok, out) = run(
            "dig",
            &[
                &format!("@{ip}"),
                "-p",
                port,
                "+short",
                "+time=2",
                "+tries=1",
                name,
                rtype,
            ],
        );
        assert!(ok, "dig {name} {rtype}: {out}");
        out.trim().to_owned()
    }

    pub fn stop(&mut self) {
        infra("powerdns.sh", "stop", self.dir.path(), &[]);
        self.running = false;
    }
}

impl Drop for PowerDns {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("bash")
                .arg(repo().join("tests/infra/powerdns.sh"))
                .arg("stop")
                .arg(self.dir.path())
                .output();
        }
    }
}

// === swaks ===

/// One swaks run: its exit status and full transcript.
#[derive(Debug)]
pub struct SwaksRun {
    pub success: bool,
    pub transcript: String,
}

impl SwaksRun {
    /// The server's reply lines in order (`250 2.0.0 ...`), whether in clear or inside TLS.
    pub fn replies(&self) -> Vec<String> {
        self.transcript
            .lines()
            .map(str::trim_start)
            .filter_map(|l| {
                ["<-", "<~", "<**", "<~*"]
                    .iter()
                    .rev()
                    .find_map(|p| l.strip_prefix(p))
            })
            .map(|l| l.trim().to_owned())
            .filter(|l| l.len() >= 3 && l.as_bytes()[..3].iter().all(u8::is_ascii_digit))
            .collect()
    }

    /// The last reply before QUIT's `221`: the end-of-DATA reply, or the refusal that ended
    /// the transaction.
    pub fn final_reply(&self) -> String {
        self.replies()
            .into_iter()
            .rev()
            .find(|r| !r.starts_with("221"))
            .unwrap_or_default()
    }
}

/// Runs swaks against `server` with `--helo client.test` and `args`.
/// `--tls` needs Perl's Net::SSLeay (libnet-ssleay-perl, which `make deps` installs).
pub fn swaks(server: SocketAddr, args: &[&str]) -> SwaksRun {
    require("swaks");
    if args.iter().any(|a| a.starts_with("--tls")) {
        let ok = Command::new("perl")
            .args(["-MNet::SSLeay", "-e", "1"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "swaks --tls needs Perl's Net::SSLeay (libnet-ssleay-perl): run `make deps` (as root) first"
        );
    }
    let out = Command::new("swaks")
        .args(["--server", &server.to_string(), "--helo", "client.test"])
        .args(["--timeout", "30"])
        .args(args)
        .output()
        .expect("run swaks");
    let mut transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    transcript.push_str(&String::from_utf8_lossy(&out.stderr));
    SwaksRun {
        success: out.status.success(),
        transcript,
    }
}

// === TLS certificate ===

/// A self-signed certificate and its key (PEM) in a temporary directory.
pub struct SelfSigned {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a self-signed P-256 certificate for `mx2.example.test` with the `openssl` CLI.
pub fn self_signed_cert() -> SelfSigned {
    let dir = state_dir("tls");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let (ok, out) = run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "7",
            "-subj",
            "/CN=mx2.example.test",
            "-addext",
            "subjectAltName=DNS:mx2.example.test",
        ],
    );
    assert!(
        ok && cert.exists() && key.exists(),
        "openssl req failed:\n{out}"
    );
    SelfSigned { dir, cert, key }
}

// === a raw SMTP client ===

/// How long one reply may take before the test fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A PROXY protocol v1 line presenting `client_ip` as the client of a connection to `server`.
/// (For an IPv6 client the destination is given as `::1`: both addresses of a line must be of
/// the family it names.)
pub fn proxy_v1(client_ip: &str, server: SocketAddr) -> Vec<u8> {
    let (family, dest) = if client_ip.contains(':') {
        ("TCP6", "::1".to_owned())
    } else {
        ("TCP4", server.ip().to_string())
    };
    format!(
        "PROXY {family} {client_ip} {dest} 40000 {}\r\n",
        server.port()
    )
    .into_bytes()
}

/// A raw SMTP connection: commands and bytes are sent exactly as given, replies read one by one.
pub struct Smtp {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    /// The server's first reply (the `220` banner, or a `421` refusal).
    pub greeting: String,
}

impl Smtp {
    /// Connects, sends `preamble` (e.g. a PROXY header; may be empty) and reads the greeting.
    pub async fn open(addr: SocketAddr, preamble: &[u8]) -> std::io::Result<Smtp> {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
        let (r, mut w) = s.into_split();
        if !preamble.is_empty() {
            w.write_all(preamble).await?;
        }
        let mut c = Smtp {
            r: BufReader::new(r),
            w,
            greeting: String::new(),
        };
        c.greeting = c.try_reply().await?;
        Ok(c)
    }

    /// Connects without a PROXY header; the greeting must be `220`.
    pub async fn connect(addr: SocketAddr) -> Smtp {
        let c = Self::open(addr, b"").await.expect("SMTP connect");
        assert!(c.greeting.starts_with("220"), "greeting: {}", c.greeting);
        c
    }

    /// Connects through a PROXY v1 header naming `client_ip`; the greeting must be `220`.
    pub async fn connect_as(addr: SocketAddr, client_ip: &str) -> Smtp {
        let c = Self::open(addr, &proxy_v1(client_ip, addr))
            .await
            .expect("SMTP connect");
        assert!(c.greeting.starts_with("220"), "greeting: {}", c.greeting);
        c
    }

    /// Reads one (possibly multi-line) reply; lines are joined with `\n`.
    pub async fn try_reply(&mut self) -> std::io::Result<String> {
        let read = async {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                if self.r.read_line(&mut line).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("connection closed after {all:?}"),
                    ));
                }
                let more = line.as_bytes().get(3) == Some(&b'-');
                all.push_str(line.trim_end());
                if !more {
                    return Ok(all);
                }
                all.push('\n');
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, read)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))?
    }

    /// Reads one reply; fails the test when none comes.
    pub async fn reply(&mut self) -> String {
        self.try_reply().await.expect("an SMTP reply")
    }

    /// Sends bytes as they are.
    pub async fn write(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("SMTP write");
    }

    /// Sends bytes as they are; `Err` when the server has closed the connection.
    pub async fn try_write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes).await
    }

    /// Sends `line` + CRLF and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.try_cmd(line).await.expect("an SMTP reply")
    }

    /// Sends `line` + CRLF and returns the reply; `Err` when the connection failed.
    pub async fn try_cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.try_write(format!("{line}\r\n").as_bytes()).await?;
        self.try_reply().await
    }

    /// Sends `line` and asserts the reply starts with `expect`.
    pub async fn expect(&mut self, line: &str, expect: &str) -> String {
        let r = self.cmd(line).await;
        assert!(
            r.starts_with(expect),
            "{line:?}: expected {expect:?}, got {r:?}"
        );
        r
    }

    /// `DATA`, then `message` dot-stuffed and terminated: the reply to the end of DATA (or the
    /// refusal of `DATA` itself).
    pub async fn data(&mut self, message: &[u8]) -> String {
        let r = self.cmd("DATA").await;
        if !r.starts_with("354") {
            return r;
        }
        let stuffed = dot_stuffed(message);
        self.write(&stuffed).await;
        self.reply().await
    }

    /// One transaction: MAIL, RCPTs, DATA. Returns the end-of-DATA reply, or the first refusal
    /// (after which the transaction is reset).
    pub async fn mail(&mut self, from: &str, to: &[&str], message: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        if !r.starts_with("250") {
            return r;
        }
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>")).await;
            if !r.starts_with("250") {
                self.cmd("RSET").await;
                return r;
            }
        }
        self.data(message).await
    }

    /// `QUIT` (ignoring a connection already closed).
    pub async fn quit(mut self) {
        let _ = self.w.write_all(b"QUIT\r\n").await;
        let _ = self.try_reply().await;
    }
}

/// `message` as DATA sends it: CRLF-terminated, dot-stuffed, followed by the `.` line.
pub fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(message.len() + 16);
    let mut bol = true;
    for &b in message {
        if bol && b == b'.' {
            stuffed.push(b'.');
        }
        stuffed.push(b);
        bol = b == b'\n';
    }
    if !stuffed.ends_with(b"\r\n") {
        stuffed.extend_from_slice(b"\r\n");
    }
    stuffed.extend_from_slice(b".\r\n");
    stuffed
}

// === mx-pod helpers ===

/// The value of `mxpod_rejected_total{reason="REASON"}` on GET /metrics.
pub async fn rejected(pod: &MxPod, reason: &str) -> u64 {
    metric(pod, &format!("mxpod_rejected_total{{reason=\"{reason}\"}}")).await
}

/// The value of a metric series (`name{labels}` exactly as rendered) on GET /metrics.
pub async fn metric(pod: &MxPod, series: &str) -> u64 {
    pod.metric(series).await as u64
}

/// Lets replay run (1 worker) until the queue is empty and `sink` holds `expected` messages;
/// returns their texts, oldest first.
pub async fn replay_to_sink(pod: &MxPod, sink: &Sink, expected: usize) -> Vec<String> {
    pod.set_replay(1, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;
    wait_for(
        &format!("{expected} message(s) in the sink"),
        Duration::from_secs(20),
        || async { sink.dumped().len() >= expected },
    )
    .await;
    let dumps: Vec<String> = sink
        .dumped()
        .into_iter()
        .map(|(_, m)| String::from_utf8_lossy(&m).into_owned())
        .collect();
    assert_eq!(dumps.len(), expected, "messages in the sink: {dumps:#?}");
    dumps
}

/// The header section of a message (up to the first empty line), CRLF or LF.
pub fn header_section(message: &str) -> &str {
    let end = message
        .find("\r\n\r\n")
        .or_else(|| message.find("\n\n"))
        .unwrap_or(message.len());
    &message[..end]
}

/// The header fields named `name` (case-insensitive), unfolded.
pub fn header_fields(message: &str, name: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in header_section(message).lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(c) = current.as_mut() {
                c.push(' ');
                c.push_str(line.trim());
            }
            continue;
        }
        if let Some(c) = current.take() {
            fields.push(c);
        }
        let is_it = line
            .split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name));
        if is_it {
            current = Some(line.to_owned());
        }
    }
    fields.extend(current);
    fields
}
