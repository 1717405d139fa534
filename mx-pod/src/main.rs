//! `mx-pod`: the backup MX queue server and its queue tools (like Postfix's `postqueue` and
//! `postsuper`), which talk to a running server's admin API.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mx_pod::{
    admin::{MessageSummary, QueueSummary},
    config::Config,
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "mx-pod", version, about = "Backup MX queue server")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MXPOD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (SMTP, queue, replay, admin API) until SIGTERM.
    Serve {
        #[arg(long, short, env = "MXPOD_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and print it with defaults filled in.
    CheckConfig {
        #[arg(long, short, env = "MXPOD_CONFIG")]
        config: PathBuf,
    },
    /// Inspect and manage the queue of a running server.
    Queue {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Show or change the replay workers and rate of a running server.
    Replay {
        #[command(flatten)]
        target: Target,
        /// Concurrent delivery sessions (0 holds everything).
        #[arg(long)]
        workers: Option<usize>,
        /// Messages per second for the whole server (0 = unlimited).
        #[arg(long)]
        rate: Option<u32>,
    },
    /// Stop accepting mail and deliver what is queued (before removing a server).
    Drain {
        #[command(flatten)]
        target: Target,
    },
}

/// Where the admin API is and how to authenticate.
#[derive(Args)]
struct Target {
    /// Admin API base URL, e.g. http://127.0.0.1:8025.
    #[arg(long, global = true, env = "MXPOD_ADMIN")]
    admin: Option<String>,
    /// File with the bearer token for mutating calls.
    #[arg(long, global = true, env = "MXPOD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Take the admin address and token file from this server configuration.
    #[arg(long, short, global = true, env = "MXPOD_CONFIG")]
    config: Option<PathBuf>,
    /// Print raw JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum QueueAction {
    /// List queued messages, oldest first.
    List {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one message's envelope and per-recipient state.
    Show { id: String },
    /// Hold a message, a domain, or (without either) everything.
    Hold {
        id: Option<String>,
        #[arg(long)]
        domain: Option<String>,
    },
    /// Release what `hold` held.
    Release {
        id: Option<String>,
        #[arg(long)]
        domain: Option<String>,
    },
    /// Retry deferred mail now.
    Flush {
        #[arg(long)]
        domain: Option<String>,
    },
    /// Delete a message without notifying anyone.
    Delete { id: String },
    /// Acknowledge damage in the queue log (all, or one segment's) after inspecting it: stops
    /// the reports and lets the damaged segment be deleted once no intact message in it is
    /// queued. Copy `log/<segment>.seg` first to keep it for analysis.
    Repair {
        /// One segment, e.g. 0000000000000003.
        #[arg(long)]
        segment: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mx-pod: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            mx_pod::server::run(config).await
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            c.check_files()?;
            print!("{}", c.to_toml());
            Ok(())
        }
        Command::Queue { target, action } => queue(target, action).await,
        Command::Replay {
            target,
            workers,
            rate,
        } => {
            let api = Api::new(&target)?;
            let body = if workers.is_some() || rate.is_some() {
                let mut patch = serde_json::Map::new();
                if let Some(w) = workers {
                    patch.insert("workers".into(), json!(w));
                }
                if let Some(r) = rate {
                    patch.insert("rate_per_second".into(), json!(r));
                }
                api.send(
                    reqwest::Method::PUT,
                    "/v1/replay",
                    Some(Value::Object(patch)),
                )
                .await?
            } else {
                api.get("/v1/replay").await?
            };
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
        Command::Drain { target } => {
            let api = Api::new(&target)?;
            let v = api.send(reqwest::Method::POST, "/v1/drain", None).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}

/// A `--domain` as typed (any spelling of a domain, or `_dsn`) in the route form the server
/// keeps: refused here, before any call, when it is no domain at all.
fn route_arg(domain: Option<String>) -> anyhow::Result<Option<String>> {
    domain
        .map(|d| {
            if d == mx_pod::queue::index::DSN_ROUTE {
                return Ok(d);
            }
            mx_pod::config::route_from_admin(&d).map_err(|e| anyhow::anyhow!("--domain: {e}"))
        })
        .transpose()
}

async fn queue(target: Target, action: QueueAction) -> anyhow::Result<()> {
    let action = match action {
        QueueAction::List { domain, limit } => QueueAction::List {
            domain: route_arg(domain)?,
            limit,
        },
        QueueAction::Hold { id, domain } => QueueAction::Hold {
            id,
            domain: route_arg(domain)?,
        },
        QueueAction::Release { id, domain } => QueueAction::Release {
            id,
            domain: route_arg(domain)?,
        },
        QueueAction::Flush { domain } => QueueAction::Flush {
            domain: route_arg(domain)?,
        },
        other => other,
    };
    let api = Api::new(&target)?;
    let selector =
        |id: Option<String>, domain: Option<String>| Some(json!({"id": id, "domain": domain}));
    let out = match action {
        QueueAction::List { domain, limit } => {
            let mut path = format!("/v1/queue/messages?limit={limit}");
            if let Some(d) = &domain {
                path.push_str(&format!("&domain={d}"));
            }
            let list = api.get(&path).await?;
            let summary = api.get("/v1/queue").await?;
            if target.json {
                json!({"summary": summary, "messages": list})
            } else {
                let list: Vec<MessageSummary> = serde_json::from_value(list)?;
                let summary: QueueSummary = serde_json::from_value(summary)?;
                print_list(&list, &summary);
                return Ok(());
            }
        }
        QueueAction::Show { id } => api.get(&format!("/v1/queue/messages/{id}")).await?,
        QueueAction::Hold { id, domain } => {
            api.send(
                reqwest::Method::POST,
                "/v1/queue/hold",
                selector(id, domain),
            )
            .await?
        }
        QueueAction::Release { id, domain } => {
            api.send(
                reqwest::Method::POST,
                "/v1/queue/release",
                selector(id, domain),
            )
            .await?
        }
        QueueAction::Flush { domain } => {
            api.send(
                reqwest::Method::POST,
                "/v1/queue/flush",
                selector(None, domain),
            )
            .await?
        }
        QueueAction::Repair { segment } => {
            api.send(
                reqwest::Method::POST,
                "/v1/queue/repair",
                Some(json!({ "segment": segment })),
            )
            .await?
        }
        QueueAction::Delete { id } => {
            api.send(
                reqwest::Method::DELETE,
                &format!("/v1/queue/messages/{id}"),
                None,
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Prints a listing like `postqueue -p`.
fn print_list(list: &[MessageSummary], summary: &QueueSummary) {
    if list.is_empty() {
        println!("Mail queue is empty");
    } else {
        println!(
            "{:<17} {:>8} {:<21} {:>6}  Sender / Recipients",
            "Queue ID", "Size", "Arrival", "Age"
        );
        for m in list {
            let flag = if m.held { "!" } else { "" };
            println!(
                "{:<17} {:>8} {:<21} {:>6}  {}",
                format!("{}{flag}", m.id),
                m.size,
                m.arrival,
                age(m.age_seconds),
                if m.sender.is_empty() { "<>" } else { &m.sender }
            );
            for r in &m.recipients {
                let mut state = r.status.clone();
                if r.attempts > 0 {
                    state.push_str(&format!(", {} attempts", r.attempts));
                }
                if let Some(e) = &r.last_error {
                    state.push_str(&format!(": {e}"));
                }
                println!("{:58}  {} ({state})", "", r.address);
            }
        }
    }
    println!(
        "-- {} message(s), {} bytes{}{}",
        summary.messages,
        summary.bytes,
        if summary.held {
            ", everything HELD"
        } else {
            ""
        },
        if summary.draining { ", DRAINING" } else { "" }
    );
    for d in &summary.damage {
        println!(
            "DAMAGE {}{}{}: {}{}",
            d.what.as_str(),
            d.segment
                .as_deref()
                .map(|s| format!(" in {s}"))
                .unwrap_or_default(),
            d.offset.map(|o| format!(" at {o}")).unwrap_or_default(),
            d.detail,
            if d.messages.is_empty() {
                String::new()
            } else {
                format!(
                    " (bounced to corrupt/: {})",
                    d.messages
                        .iter()
                        .map(|m| m.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    if !summary.damage.is_empty() {
        println!("-- inspect, then acknowledge with `mx-pod queue repair`");
    }
    for d in &summary.domains {
        println!(
            "   {:<30} {:>7} msgs {:>12} bytes  oldest {:>6}{}",
            d.domain,
            d.messages,
            d.bytes,
            age(d.oldest_age_seconds),
            if d.held { "  HELD" } else { "" }
        );
    }
}

fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A small client of the admin API.
struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(t: &Target) -> anyhow::Result<Self> {
        let config = t.config.as_deref().map(Config::load).transpose()?;
        let base = match (&t.admin, &config) {
            (Some(a), _) => a.trim_end_matches('/').to_owned(),
            (None, Some(c)) => {
                let mut addr = c.admin.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
            (None, None) => "http://127.0.0.1:8025".to_owned(),
        };
        let token_file = t
            .token_file
            .clone()
            .or_else(|| config.as_ref().and_then(|c| c.admin.token_file.clone()));
        let token = token_file
            .map(|f| {
                std::fs::read_to_string(&f)
                    .map(|s| s.trim().to_owned())
                    .with_context(|| format!("cannot read token file {}", f.display()))
            })
            .transpose()?;
        Ok(Api {
            base,
            token,
            http: mx_pod::trust::Trust::webpki().client(),
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
                bail!("{method} {path}: {status}: {msg} (give --token-file or --config)");
            }
            bail!("{method} {path}: {status}: {msg}");
        }
        Ok(value)
    }
}
