//! RFC 2136 dynamic update, signed with TSIG (RFC 8945), sent straight to a zone's primary
//! server (BIND, Knot, PowerDNS with `dnsupdate=yes`, ...), over TCP.
//!
//! # API
//!
//! [`Rfc2136::new`] takes the server's address, the TSIG key's name, its algorithm
//! (`hmac-sha256`, `hmac-sha384` or `hmac-sha512`) and its secret in base64, as found in a BIND
//! key file (`tsig-keygen`) or `nsupdate -y ALG:NAME:SECRET`. [`Rfc2136::unsigned`] is for
//! servers that authorize updates by source address.
//!
//! - [`DnsProvider::records`] asks the server itself (not a resolver) for the MX, A, AAAA, TXT
//!   and CNAME records at the name, one TCP connection carrying the five queries. Only
//!   authoritative answers count: a server that does not serve the zone gives
//!   [`DnsErrorKind::ZoneNotFound`].
//! - [`DnsProvider::apply`] sends ONE `UPDATE` message: the zone section names the zone (type
//!   SOA), the update section holds every removal as "delete an RR from an RRset" (class NONE,
//!   TTL 0, the record's data; RFC 2136 2.5.4) followed by every addition (class IN, its TTL;
//!   2.5.1), see [`update_message`]. No prerequisites: removing a record that is absent is
//!   silently ignored by the server, adding one that is there changes nothing.
//!
//! # Atomicity
//!
//! A primary applies an update message all or nothing (RFC 2136 3.2-3.4: prerequisites, then
//! every update RR, a failure rolls the whole message back), so the backup's MX, its target's
//! address and the ownership TXT appear or go together, and readers never see an MX without
//! the A record it points to. Other members of the RRsets (the primary's own MX) are not
//! touched, since records are added and deleted singly rather than by RRset.
//!
//! An RRset has one TTL, and BIND silently gives the whole RRset the TTL of a record added to
//! it (the primary's MX at 3600 s becomes 300 s when a 300 s MX joins it, and stays so after it
//! leaves). So, like the PowerDNS provider, an addition to an RRset that keeps other members
//! takes that RRset's TTL ([`keep_rrset_ttls`]), read over the same connection just before the
//! update; that read and the update are not one transaction, which can only affect a TTL.
//! A removal matches a record with exactly the same data, for TXT including how the text is
//! cut into character-strings (we cut as [`txt::split`]: at 255 bytes, never inside a UTF-8
//! character).
//!
//! # TSIG
//!
//! Updates are signed by hickory's `TSigner` (fudge 300 s, so the clocks may differ by five
//! minutes) and the server's answer is verified with the same key: a `NOERROR` whose signature
//! does not verify is an error, never a success. Queries are not signed (servers do not ask for
//! it). When the server rejects our signature it answers `NOTAUTH` with a TSIG error (BADSIG,
//! BADKEY, BADTIME) and, as RFC 8945 5.3.2 says, without a MAC it could compute; that answer
//! cannot be verified, so the connection keeps the rcode and TSIG error of every answer it
//! reads, only to name the failure.
//!
//! # Errors
//!
//! | answer | kind |
//! | --- | --- |
//! | `NOERROR` (signature verified) | `Ok` |
//! | `REFUSED`, `NOTAUTH` with TSIG error BADSIG/BADKEY/BADTIME, a signature that does not verify | [`DnsErrorKind::Auth`] |
//! | `NOTAUTH` without a TSIG error (the server is not authoritative for the zone), `NOTZONE` | [`DnsErrorKind::ZoneNotFound`] |
//! | `SERVFAIL`, timeout, connection failure | [`DnsErrorKind::Unreachable`] |
//! | anything else (`FORMERR`, `NOTIMP`, `YXRRSET`, ...) | [`DnsErrorKind::Rejected`] |
//!
//! RFC 2136 gives `NOTAUTH` one meaning ("not authoritative for the zone"), RFC 8945 another
//! (a TSIG failure, with the TSIG error set): the TSIG error tells them apart. BIND answers an
//! update for a zone it does not serve with `NOTAUTH` and no TSIG error, hence
//! [`DnsErrorKind::ZoneNotFound`]. `REFUSED` also comes from server policy: BIND refuses an MX
//! whose target lies in the zone but has no address record (its check-integrity), which the
//! operator avoids by adding the A record in the same message. Every message names the rcode.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use hickory_net::{
    DnsHandle, NetError,
    client::{Client, ClientHandle},
    proto::{
        op::{
            DnsRequest, DnsResponse, Message, OpCode, Query, ResponseCode, SerialMessage,
            UpdateMessage,
        },
        rr::{
            DNSClass, Name, RData as HRData, Record as HRecord, RecordType as HRecordType, TSigner,
            rdata::{self, tsig::TsigAlgorithm, tsig::TsigError},
        },
    },
    runtime::TokioRuntimeProvider,
    tcp::TcpClientStream,
    xfer::{DnsClientStream, DnsMultiplexer},
};

use super::{
    Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record, RecordType, normalize_name, txt,
};

const NAME: &str = "rfc2136";

/// Allowed clock difference between us and the server for a TSIG signature (RFC 8945 suggests
/// 300 s).
const FUDGE_S: u16 = 300;

/// Default timeout for connecting and for each answer.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TSIG algorithms hickory can sign with.
const SUPPORTED_ALGORITHMS: &str = "hmac-sha256, hmac-sha384, hmac-sha512";

/// A primary server taking RFC 2136 updates, with the TSIG key that may update the zone.
#[derive(Clone)]
pub struct Rfc2136 {
    server: SocketAddr,
    signer: Option<TSigner>,
    timeout: Duration,
}

impl fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // never the secret
        let mut d = f.debug_struct("Rfc2136");
        d.field("server", &self.server);
        match &self.signer {
            Some(s) => d
                .field("key", &normalize_name(&s.signer_name().to_ascii()))
                .field("algorithm", &s.algorithm().to_name().to_ascii()),
            None => d.field("key", &"(unsigned)"),
        };
        d.field("timeout", &self.timeout).finish()
    }
}

impl Rfc2136 {
    /// Updates signed with TSIG key `key_name`: `algorithm` is `hmac-sha256` (also when empty),
    /// `hmac-sha384` or `hmac-sha512` (case and a trailing dot do not matter), `secret_base64`
    /// the key's secret as BIND's key file has it. A bad name, algorithm or secret is a
    /// [`DnsErrorKind::Auth`] error saying which (the secret itself is never in the message).
    pub fn new(
        server: SocketAddr,
        key_name: &str,
        algorithm: &str,
        secret_base64: &str,
    ) -> Result<Self, DnsError> {
        let algorithm = parse_algorithm(algorithm)?;
        let secret = parse_secret(secret_base64)?;
        let key = normalize_name(key_name);
        if key.is_empty() {
            return Err(auth_config("the TSIG key name is empty".into()));
        }
        let name = Name::from_ascii(format!("{key}.")).map_err(|e| {
            auth_config(format!(
                "the TSIG key name {key_name:?} is no domain name: {e}"
            ))
        })?;
        let signer = TSigner::new(secret, algorithm, name, FUDGE_S)
            .map_err(|e| auth_config(format!("TSIG key {key}: {e}")))?;
        Ok(Self {
            server,
            signer: Some(signer),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Updates without TSIG, for a server that allows updates by source address
    /// (`allow-update { 10.0.0.0/8; }`). Servers that want a key answer `REFUSED`.
    pub fn unsigned(server: SocketAddr) -> Self {
        Self {
            server,
            signer: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Changes the timeout (connecting, and waiting for each answer; 10 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The TSIG key's name (lower case, without the trailing dot), if updates are signed.
    pub fn key_name(&self) -> Option<String> {
        self.signer
            .as_ref()
            .map(|s| normalize_name(&s.signer_name().to_ascii()))
    }

    /// A new TCP connection to the server; updates sent on it are signed when we have a key.
    async fn connect(&self) -> Result<Conn, DnsError> {
        let (stream, handle) = TcpClientStream::new(
            self.server,
            None,
            Some(self.timeout),
            TokioRuntimeProvider::new(),
        );
        let stream = tokio::time::timeout(self.timeout, stream)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "connecting to {}: no connection within {:?}",
                    self.server, self.timeout
                ))
            })?
            .map_err(|e| unreachable(format!("connecting to {}: {e}", self.server)))?;
        let seen = Arc::new(Mutex::new(None));
        let tap = Tap {
            inner: stream,
            seen: seen.clone(),
        };
        let mut mux = DnsMultiplexer::new(tap, handle).with_timeout(self.timeout);
        if let Some(signer) = &self.signer {
            mux = mux.with_signer(signer.clone());
        }
        let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(mux);
        // ends once the client (and its clones) are dropped
        tokio::spawn(bg);
        Ok(Conn { client, seen })
    }

    /// The records of `types` at `name`, asked on `conn` (one query per type, all at once).
    /// Only authoritative answers count.
    async fn query(
        &self,
        conn: &Conn,
        zone: &str,
        name: &str,
        types: &[RecordType],
    ) -> Result<Vec<Record>, DnsError> {
        let owner = dns_name(name)?;
        let want = normalize_name(name);
        let queries = types.iter().map(|&t| {
            let mut client = conn.client.clone();
            let owner = owner.clone();
            async move { (t, client.query(owner, DNSClass::IN, hickory_type(t)).await) }
        });
        let answers = tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            futures::future::join_all(queries),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "query {want} at {}: no answer within {:?}",
                self.server, self.timeout
            ))
        })?;
        let mut out = Vec::new();
        for (t, answer) in answers {
            let what = format!("query {want} {} at {}", t.as_str(), self.server);
            let resp: DnsResponse = answer.map_err(|e| unreachable(format!("{what}: {e}")))?;
            match resp.metadata.response_code {
                ResponseCode::NoError | ResponseCode::NXDomain => {}
                rc @ (ResponseCode::Refused | ResponseCode::NotAuth) => {
                    return Err(DnsError::new(
                        NAME,
                        DnsErrorKind::ZoneNotFound,
                        format!(
                            "{what}: {}: the server does not serve zone {zone} (or does not let us query it)",
                            rcode_name(rc)
                        ),
                    ));
                }
                ResponseCode::ServFail => {
                    return Err(unreachable(format!("{what}: SERVFAIL")));
                }
                rc => {
                    return Err(DnsError::new(
                        NAME,
                        DnsErrorKind::Protocol,
                        format!("{what}: {} ({rc})", rcode_name(rc)),
                    ));
                }
            }
            if !resp.metadata.authoritative {
                return Err(DnsError::new(
                    NAME,
                    DnsErrorKind::ZoneNotFound,
                    format!(
                        "{what}: the answer is not authoritative: the server is no primary for zone {zone}"
                    ),
                ));
            }
            let ht = hickory_type(t);
            out.extend(
                resp.answers
                    .iter()
                    .filter(|r| r.record_type() == ht)
                    .filter_map(from_hickory)
                    .filter(|r| r.name == want),
            );
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The RRsets the additions of `changes` join, as they are now (best effort: empty when
    /// they cannot be read; the update itself will then say what is wrong).
    async fn rrsets_added_to(&self, conn: &Conn, zone: &str, changes: &Changes) -> Vec<Record> {
        let mut wanted: BTreeMap<&str, Vec<RecordType>> = BTreeMap::new();
        for r in &changes.add {
            let types = wanted.entry(r.name.as_str()).or_default();
            if !types.contains(&r.record_type()) {
                types.push(r.record_type());
            }
        }
        let reads = wanted
            .iter()
            .map(|(name, types)| self.query(conn, zone, name, types));
        let mut out = Vec::new();
        for read in futures::future::join_all(reads).await {
            match read {
                Ok(records) => out.extend(records),
                Err(e) => {
                    tracing::debug!(error = %e, "rfc2136: reading the RRsets before the update");
                    return Vec::new();
                }
            }
        }
        out
    }

    /// The key's name for messages.
    fn key_label(&self) -> String {
        self.key_name()
            .map_or_else(|| "no TSIG key (unsigned)".into(), |k| format!("key {k}"))
    }
}

/// One connection: the client and the last answer its stream read.
struct Conn {
    client: Client<TokioRuntimeProvider>,
    seen: Arc<Mutex<Option<Seen>>>,
}

/// What an answer said, recorded before hickory verifies its signature: an answer rejecting our
/// signature carries no valid MAC, so verification fails and would hide the rcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    rcode: ResponseCode,
    tsig_error: Option<TsigError>,
    signed: bool,
    /// The TSIG record carries a MAC (answers reporting BADSIG/BADKEY carry none).
    mac: bool,
}

impl Seen {
    fn of(bytes: &[u8]) -> Option<Self> {
        let m = Message::from_vec(bytes).ok()?;
        Some(Seen {
            rcode: m.metadata.response_code,
            tsig_error: m.signature().and_then(|s| s.data.error),
            signed: m.signature().is_some(),
            mac: m.signature().is_some_and(|s| !s.data.mac.is_empty()),
        })
    }
}

/// The TCP stream, noting each answer's rcode and TSIG error into `seen`.
struct Tap<S> {
    inner: S,
    seen: Arc<Mutex<Option<Seen>>>,
}

impl<S: DnsClientStream> Stream for Tap<S> {
    type Item = Result<SerialMessage, NetError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.poll_next_unpin(cx);
        if let Poll::Ready(Some(Ok(msg))) = &item
            && let Some(seen) = Seen::of(msg.bytes())
        {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        }
        item
    }
}

impl<S: DnsClientStream> DnsClientStream for Tap<S> {
    type Time = S::Time;

    fn name_server_addr(&self) -> SocketAddr {
        self.inner.name_server_addr()
    }
}

/// Parses a TSIG algorithm name; empty means `hmac-sha256`.
pub fn parse_algorithm(algorithm: &str) -> Result<TsigAlgorithm, DnsError> {
    let a = normalize_name(algorithm);
    Ok(match a.as_str() {
        "" | "hmac-sha256" => TsigAlgorithm::HmacSha256,
        "hmac-sha384" => TsigAlgorithm::HmacSha384,
        "hmac-sha512" => TsigAlgorithm::HmacSha512,
        "hmac-sha1"
        | "hmac-sha224"
        | "hmac-md5"
        | "hmac-md5.sig-alg.reg.int"
        | "hmac-sha256-128"
        | "hmac-sha384-192"
        | "hmac-sha512-256" => {
            return Err(auth_config(format!(
                "TSIG algorithm {a} is not supported (supported: {SUPPORTED_ALGORITHMS}); \
                 make a key with one of them, e.g. `tsig-keygen -a hmac-sha256 NAME`"
            )));
        }
        _ => {
            return Err(auth_config(format!(
                "unknown TSIG algorithm {algorithm:?} (supported: {SUPPORTED_ALGORITHMS})"
            )));
        }
    })
}

/// Decodes a base64 TSIG secret (whitespace ignored, padding optional).
pub fn parse_secret(secret_base64: &str) -> Result<Vec<u8>, DnsError> {
    let s: String = secret_base64
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if s.is_empty() {
        return Err(auth_config("the TSIG secret is empty".into()));
    }
    let decoded = data_encoding::BASE64
        .decode(s.as_bytes())
        .or_else(|_| data_encoding::BASE64_NOPAD.decode(s.trim_end_matches('=').as_bytes()));
    match decoded {
        Ok(key) if !key.is_empty() => Ok(key),
        Ok(_) => Err(auth_config("the TSIG secret decodes to nothing".into())),
        Err(e) => Err(auth_config(format!(
            "the TSIG secret is not valid base64 ({} characters): {e}",
            s.len()
        ))),
    }
}

fn auth_config(message: String) -> DnsError {
    DnsError::new(NAME, DnsErrorKind::Auth, message)
}

fn unreachable(message: String) -> DnsError {
    DnsError::new(NAME, DnsErrorKind::Unreachable, message)
}

/// `name` as an absolute DNS name.
fn dns_name(name: &str) -> Result<Name, DnsError> {
    let n = normalize_name(name);
    if n.is_empty() {
        return Ok(Name::root());
    }
    Name::from_ascii(format!("{n}.")).map_err(|e| {
        DnsError::new(
            NAME,
            DnsErrorKind::Rejected,
            format!("{name:?} is no domain name: {e}"),
        )
    })
}

/// `name` must be the zone or below it.
fn check_in_zone(zone: &Name, name: &Name, what: &str) -> Result<(), DnsError> {
    if zone.zone_of(name) {
        return Ok(());
    }
    Err(DnsError::new(
        NAME,
        DnsErrorKind::ZoneNotFound,
        format!(
            "{what}: {} is not inside zone {}",
            normalize_name(&name.to_ascii()),
            normalize_name(&zone.to_ascii())
        ),
    ))
}

fn hickory_type(t: RecordType) -> HRecordType {
    match t {
        RecordType::A => HRecordType::A,
        RecordType::Aaaa => HRecordType::AAAA,
        RecordType::Mx => HRecordType::MX,
        RecordType::Txt => HRecordType::TXT,
        RecordType::Cname => HRecordType::CNAME,
    }
}

/// Our record data as hickory's; TXT is cut into character-strings as [`txt::split`] does.
fn to_hickory(data: &RData) -> Result<HRData, DnsError> {
    Ok(match data {
        RData::A(a) => HRData::A(rdata::A(*a)),
        RData::Aaaa(a) => HRData::AAAA(rdata::AAAA(*a)),
        RData::Mx(pref, host) => HRData::MX(rdata::MX::new(*pref, dns_name(host)?)),
        RData::Txt(text) => HRData::TXT(rdata::TXT::from_bytes(
            txt::split(text).into_iter().map(str::as_bytes).collect(),
        )),
        RData::Cname(host) => HRData::CNAME(rdata::CNAME(dns_name(host)?)),
    })
}

/// A record from an answer as ours, if it has one of our types.
fn from_hickory(r: &HRecord) -> Option<Record> {
    let data = match &r.data {
        HRData::A(a) => RData::A(a.0),
        HRData::AAAA(a) => RData::Aaaa(a.0),
        HRData::MX(mx) => RData::Mx(mx.preference, normalize_name(&mx.exchange.to_ascii())),
        HRData::TXT(txt) => RData::Txt(
            txt.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect(),
        ),
        HRData::CNAME(c) => RData::Cname(normalize_name(&c.0.to_ascii())),
        _ => return None,
    };
    Some(Record::new(&r.name.to_ascii(), r.ttl, data))
}

/// `changes` with each addition that joins an RRset keeping other members (those in `current`
/// not being removed) given that RRset's TTL: an RRset has one TTL, and BIND gives the whole
/// RRset the TTL of a record added to it, which would change the primary's MX TTL.
pub fn keep_rrset_ttls(changes: &Changes, current: &[Record]) -> Changes {
    let add = changes
        .add
        .iter()
        .map(|r| {
            let staying = current.iter().find(|c| {
                c.name == r.name
                    && c.record_type() == r.record_type()
                    && !changes.remove.iter().any(|x| x.same(c))
            });
            match staying {
                Some(c) => Record {
                    ttl: c.ttl,
                    ..r.clone()
                },
                None => r.clone(),
            }
        })
        .collect();
    Changes {
        add,
        remove: changes.remove.clone(),
    }
}

/// The one UPDATE message for `changes`: zone section `zone IN SOA`; update section every
/// removal (class NONE, TTL 0, RFC 2136 2.5.4), then every addition (class IN, its TTL, 2.5.1).
pub fn update_message(zone: &str, changes: &Changes) -> Result<Message, DnsError> {
    let zone_name = dns_name(zone)?;
    let mut section = Query::new();
    section
        .set_name(zone_name.clone())
        .set_query_class(DNSClass::IN)
        .set_query_type(HRecordType::SOA);
    let mut message = Message::query();
    message.metadata.op_code = OpCode::Update;
    message.metadata.recursion_desired = false;
    message.add_zone(section);
    for (r, delete) in changes
        .remove
        .iter()
        .map(|r| (r, true))
        .chain(changes.add.iter().map(|r| (r, false)))
    {
        let name = dns_name(&r.name)?;
        check_in_zone(&zone_name, &name, &format!("record {r}"))?;
        let mut rr = HRecord::from_rdata(name, r.ttl, to_hickory(&r.data)?);
        if delete {
            rr.dns_class = DNSClass::NONE;
            rr.ttl = 0;
        }
        message.add_update(rr);
    }
    Ok(message)
}

/// The error for an UPDATE answered with `rcode` (and TSIG error `tsig`), `None` for success.
fn update_error(
    zone: &str,
    key: &str,
    rcode: ResponseCode,
    tsig: Option<TsigError>,
    note: &str,
) -> Option<DnsError> {
    let code = rcode_name(rcode);
    let (kind, why) = match (rcode, tsig) {
        (ResponseCode::NoError, None) => return None,
        (_, Some(TsigError::BadSig)) => (
            DnsErrorKind::Auth,
            format!(
                "{code}, TSIG error BADSIG: the server rejected our signature (wrong secret or algorithm for {key})"
            ),
        ),
        (_, Some(TsigError::BadKey)) => (
            DnsErrorKind::Auth,
            format!(
                "{code}, TSIG error BADKEY: the server does not know {key} (or not with this algorithm)"
            ),
        ),
        (_, Some(TsigError::BadTime)) => (
            DnsErrorKind::Auth,
            format!(
                "{code}, TSIG error BADTIME: our clock and the server's differ by more than {FUDGE_S} s"
            ),
        ),
        (_, Some(e)) => (
            DnsErrorKind::Auth,
            format!(
                "{code}, TSIG error {}: the server rejected our signature ({key})",
                u16::from(e)
            ),
        ),
        (ResponseCode::Refused, None) => (
            DnsErrorKind::Auth,
            format!(
                "REFUSED: the server refused the update of zone {zone} with {key} (not allowed to update it, or a server policy such as BIND's check-integrity: an in-zone MX target without an address record)"
            ),
        ),
        (ResponseCode::NotAuth, None) => (
            DnsErrorKind::ZoneNotFound,
            format!(
                "NOTAUTH: the server is not authoritative for zone {zone} (no TSIG error: our signature was fine)"
            ),
        ),
        (ResponseCode::NotZone, None) => (
            DnsErrorKind::ZoneNotFound,
            format!("NOTZONE: a record is not inside zone {zone}"),
        ),
        (ResponseCode::ServFail, None) => (
            DnsErrorKind::Unreachable,
            format!("SERVFAIL: the server failed to apply the update of zone {zone}"),
        ),
        (_, None) => (
            DnsErrorKind::Rejected,
            format!("{code} ({rcode}): the server rejected the update of zone {zone}"),
        ),
    };
    Some(DnsError::new(
        NAME,
        kind,
        format!("UPDATE zone {zone}: {why}{note}"),
    ))
}

/// The rcode's mnemonic (`REFUSED`, `NOTAUTH`, ...).
fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

#[async_trait::async_trait]
impl DnsProvider for Rfc2136 {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn records(&self, zone: &str, name: &str) -> Result<Vec<Record>, DnsError> {
        let zone_name = dns_name(zone)?;
        let owner = dns_name(name)?;
        check_in_zone(&zone_name, &owner, &format!("reading {name}"))?;
        let conn = self.connect().await?;
        self.query(&conn, zone, name, &RecordType::ALL).await
    }

    async fn apply(&self, zone: &str, changes: &Changes) -> Result<(), DnsError> {
        if changes.is_empty() {
            return Ok(());
        }
        let zone = normalize_name(zone);
        // checked before anything goes out
        update_message(&zone, changes)?;
        let key = self.key_label();
        let conn = self.connect().await?;
        let current = self.rrsets_added_to(&conn, &zone, changes).await;
        let message = update_message(&zone, &keep_rrset_ttls(changes, &current))?;
        // only the update's answer counts from here on
        *conn.seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let sent = tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            conn.client.send(DnsRequest::from(message)).next(),
        )
        .await;
        let seen = *conn.seen.lock().unwrap_or_else(|p| p.into_inner());
        let answer = match sent {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(NetError::from("the connection closed without an answer")),
            Err(_) => Err(NetError::Timeout),
        };
        match answer {
            Ok(resp) => {
                // verified (when signed): the rcode is the server's word
                let tsig = resp.signature().and_then(|s| s.data.error);
                match update_error(&zone, &key, resp.metadata.response_code, tsig, "") {
                    None => Ok(()),
                    Some(e) => Err(e),
                }
            }
            Err(e) => match seen {
                // no answer at all
                None => Err(unreachable(format!(
                    "UPDATE zone {zone} at {}: {e}",
                    self.server
                ))),
                // an answer that did not verify: name what it said, but never call it success
                Some(seen) => {
                    let note = match (seen.signed, seen.mac) {
                        // as RFC 8945 5.3.2 has it for BADSIG/BADKEY: nothing to verify
                        (true, false) if seen.tsig_error.is_some() => {
                            " (the answer carries no MAC, as RFC 8945 5.3.2 says)".to_string()
                        }
                        (true, _) => format!(" (the answer's TSIG did not verify: {e})"),
                        (false, _) => format!(" (the answer was not signed: {e})"),
                    };
                    Err(
                        update_error(&zone, &key, seen.rcode, seen.tsig_error, &note)
                            .unwrap_or_else(|| {
                                DnsError::new(
                                    NAME,
                                    DnsErrorKind::Auth,
                                    format!(
                                        "UPDATE zone {zone}: the server answered NOERROR but its answer is not verifiably signed with {key}{note}; the change may or may not have been applied"
                                    ),
                                )
                            }),
                    )
                }
            },
        }
    }
}

#[cfg(test)]
#[path = "rfc2136_tests.rs"]
mod tests;
