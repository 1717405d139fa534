//! Unit tests of [`super`] (the rfc2136 provider), kept out of the provider's file.

use std::net::{Ipv4Addr, SocketAddr};

use hickory_net::proto::rr::rdata::tsig::{TSIG, make_tsig_record};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

const SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ=";

fn changes() -> Changes {
    Changes {
        add: vec![
            Record::new(
                "example.test",
                300,
                RData::Mx(20, "mx2.example.test".into()),
            ),
            Record::new(
                "mx2.example.test",
                60,
                RData::A(Ipv4Addr::new(192, 0, 2, 7)),
            ),
            Record::new(
                "_backupmx.example.test",
                120,
                RData::Txt("heritage=backupmx,v=1,owner=ns/b".into()),
            ),
        ],
        remove: vec![Record::new(
            "example.test",
            300,
            RData::Mx(30, "old.example.test".into()),
        )],
    }
}

#[test]
fn one_message_carries_deletes_then_adds() {
    let m = update_message("Example.Test.", &changes()).unwrap();
    assert_eq!(m.metadata.op_code, OpCode::Update);
    assert!(!m.metadata.recursion_desired);
    assert_eq!(m.zones().len(), 1);
    let z = &m.zones()[0];
    assert_eq!(z.name().to_ascii(), "example.test.");
    assert_eq!(z.query_type(), HRecordType::SOA);
    assert_eq!(z.query_class(), DNSClass::IN);
    assert!(m.prerequisites().is_empty());
    let u = m.updates();
    assert_eq!(u.len(), 4);
    // the removal first: class NONE, TTL 0, the data to match
    assert_eq!(u[0].dns_class, DNSClass::NONE);
    assert_eq!(u[0].ttl, 0);
    assert_eq!(u[0].record_type(), HRecordType::MX);
    assert_eq!(u[0].data.to_string(), "30 old.example.test.");
    // then the additions: class IN, their TTLs
    for (r, ttl, t) in [
        (&u[1], 300, HRecordType::MX),
        (&u[2], 60, HRecordType::A),
        (&u[3], 120, HRecordType::TXT),
    ] {
        assert_eq!(r.dns_class, DNSClass::IN);
        assert_eq!(r.ttl, ttl);
        assert_eq!(r.record_type(), t);
    }
    assert_eq!(u[1].name.to_ascii(), "example.test.");
    assert_eq!(u[1].data.to_string(), "20 mx2.example.test.");
    assert_eq!(u[2].name.to_ascii(), "mx2.example.test.");
    assert_eq!(u[3].name.to_ascii(), "_backupmx.example.test.");

    // survives the wire, signed: one message, one TSIG with our key and algorithm
    let signer = Rfc2136::new(
        "127.0.0.1:53".parse().unwrap(),
        "ddns-key",
        "hmac-sha256",
        SECRET,
    )
    .unwrap()
    .signer
    .unwrap();
    let mut m = m;
    m.finalize(&signer, 1_700_000_000).unwrap();
    let back = Message::from_vec(&m.to_vec().unwrap()).unwrap();
    assert_eq!(back.updates().len(), 4);
    assert_eq!(back.updates()[0].dns_class, DNSClass::NONE);
    assert_eq!(back.updates()[3].dns_class, DNSClass::IN);
    let sig = back.signature().expect("signed");
    assert_eq!(sig.name.to_ascii(), "ddns-key.");
    assert_eq!(sig.data.algorithm, TsigAlgorithm::HmacSha256);
    assert_eq!(sig.data.mac.len(), 32);
}

#[test]
fn additions_take_the_ttl_of_the_rrset_they_join() {
    let primary = Record::new(
        "example.test",
        3600,
        RData::Mx(10, "mail.example.test".into()),
    );
    let c = changes();
    // the apex MX RRset keeps the primary's MX: the backup's takes its 3600
    let kept = keep_rrset_ttls(&c, std::slice::from_ref(&primary));
    assert_eq!(kept.add[0].ttl, 3600);
    assert_eq!(kept.add[0].data, c.add[0].data);
    // other RRsets are new: their own TTLs
    assert_eq!(kept.add[1].ttl, 60);
    assert_eq!(kept.add[2].ttl, 120);
    assert_eq!(kept.remove, c.remove);
    // an RRset whose every member goes: the new TTL
    let all_go = Changes {
        add: vec![c.add[0].clone()],
        remove: vec![primary.clone()],
    };
    assert_eq!(keep_rrset_ttls(&all_go, &[primary]).add[0].ttl, 300);
}

#[test]
fn txt_is_cut_into_character_strings_and_joined_back() {
    let long = "x".repeat(600);
    let HRData::TXT(t) = to_hickory(&RData::Txt(long.clone())).unwrap() else {
        panic!("TXT expected")
    };
    assert_eq!(
        t.txt_data.iter().map(|s| s.len()).collect::<Vec<_>>(),
        [255, 255, 90]
    );
    let rec = HRecord::from_rdata(
        Name::from_ascii("_backupmx.Example.TEST.").unwrap(),
        300,
        HRData::TXT(t),
    );
    assert_eq!(
        from_hickory(&rec).unwrap(),
        Record::new("_backupmx.example.test", 300, RData::Txt(long))
    );
    let HRData::TXT(empty) = to_hickory(&RData::Txt(String::new())).unwrap() else {
        panic!("TXT expected")
    };
    assert_eq!(empty.txt_data.len(), 1);
}

#[test]
fn records_outside_the_zone_are_refused_before_sending() {
    let mut c = changes();
    c.add.push(Record::new(
        "mx.other.test",
        300,
        RData::A(Ipv4Addr::LOCALHOST),
    ));
    let e = update_message("example.test", &c).unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::ZoneNotFound);
    assert!(e.message.contains("mx.other.test"), "{e}");
    let bad = Changes {
        add: vec![Record::new(
            "a..b.example.test",
            1,
            RData::A(Ipv4Addr::LOCALHOST),
        )],
        remove: vec![],
    };
    let e = update_message("example.test", &bad).unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Rejected, "{e}");
    assert!(e.message.contains("no domain name"), "{e}");
}

#[test]
fn algorithms_and_secrets() {
    let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
    for a in [
        "",
        "hmac-sha256",
        "HMAC-SHA256.",
        "hmac-sha384",
        "hmac-sha512",
    ] {
        Rfc2136::new(server, "k", a, SECRET).unwrap_or_else(|e| panic!("{a}: {e}"));
    }
    assert_eq!(
        parse_algorithm("").unwrap(),
        TsigAlgorithm::HmacSha256,
        "hmac-sha256 is the default"
    );
    for a in ["hmac-sha1", "hmac-sha224", "hmac-md5"] {
        let e = Rfc2136::new(server, "k", a, SECRET).unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Auth);
        assert!(e.message.contains("not supported"), "{e}");
        assert!(e.message.contains("hmac-sha256"), "{e}");
    }
    let e = Rfc2136::new(server, "k", "sha256", SECRET).unwrap_err();
    assert!(e.message.contains("unknown TSIG algorithm"), "{e}");

    // whitespace and missing padding are fine
    assert_eq!(parse_secret("YWJj ZA==").unwrap(), b"abcd");
    assert_eq!(parse_secret("YWJjZA").unwrap(), b"abcd");
    for (bad, says) in [
        ("", "empty"),
        ("   ", "empty"),
        ("not base64!", "not valid base64"),
        ("=", "decodes to nothing"),
        ("YWJjZA=!", "not valid base64"),
    ] {
        let e = Rfc2136::new(server, "k", "hmac-sha256", bad).unwrap_err();
        assert_eq!(e.kind, DnsErrorKind::Auth, "{bad:?}");
        assert!(e.message.contains(says), "{bad:?}: {e}");
    }
    let e = Rfc2136::new(server, "", "hmac-sha256", SECRET).unwrap_err();
    assert!(e.message.contains("key name is empty"), "{e}");
    let e = Rfc2136::new(server, "a..b", "hmac-sha256", SECRET).unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Auth);

    // the secret never shows
    let p = Rfc2136::new(server, "DDNS-Key.", "hmac-sha512", SECRET).unwrap();
    let dbg = format!("{p:?}");
    assert!(!dbg.contains(SECRET) && dbg.contains("ddns-key"), "{dbg}");
    assert_eq!(p.key_name().as_deref(), Some("ddns-key"));
    assert_eq!(Rfc2136::unsigned(server).key_name(), None);
}

#[test]
fn rcode_mapping() {
    use DnsErrorKind::*;
    use ResponseCode as R;
    let k = |rc, tsig| update_error("example.test", "key k", rc, tsig, "").map(|e| e.kind);
    assert_eq!(k(R::NoError, None), None);
    assert_eq!(k(R::Refused, None), Some(Auth));
    assert_eq!(k(R::NotAuth, Some(TsigError::BadSig)), Some(Auth));
    assert_eq!(k(R::NotAuth, Some(TsigError::BadKey)), Some(Auth));
    assert_eq!(k(R::NotAuth, Some(TsigError::BadTime)), Some(Auth));
    assert_eq!(k(R::NotAuth, None), Some(ZoneNotFound));
    assert_eq!(k(R::NotZone, None), Some(ZoneNotFound));
    assert_eq!(k(R::ServFail, None), Some(Unreachable));
    for rc in [R::YXRRSet, R::NXRRSet, R::YXDomain, R::FormErr, R::NotImp] {
        assert_eq!(k(rc, None), Some(Rejected), "{rc:?}");
    }
    let e = update_error("example.test", "key k", R::YXRRSet, None, "").unwrap();
    assert!(e.message.contains("YXRRSET"), "{e}");
    let e = update_error(
        "example.test",
        "key k",
        R::NotAuth,
        Some(TsigError::BadSig),
        "",
    )
    .unwrap();
    assert!(
        e.message.contains("NOTAUTH") && e.message.contains("BADSIG"),
        "{e}"
    );
}

/// A DNS-over-TCP server for one connection: queries get an empty authoritative NOERROR,
/// the update gets `answer(update)` (no answer at all for `None`).
async fn fake_server(
    answer: impl FnOnce(Message) -> Option<Message> + Send + 'static,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut answer = Some(answer);
        // until the client hangs up
        while let Ok(len) = s.read_u16().await {
            let mut buf = vec![0; len as usize];
            s.read_exact(&mut buf).await.unwrap();
            let req = Message::from_vec(&buf).unwrap();
            let resp = if req.metadata.op_code == OpCode::Query {
                let mut m = reply(&req, ResponseCode::NoError);
                m.metadata.authoritative = true;
                Some(m)
            } else {
                answer.take().expect("one update per connection")(req)
            };
            if let Some(resp) = resp {
                let bytes = resp.to_vec().unwrap();
                s.write_u16(bytes.len() as u16).await.unwrap();
                s.write_all(&bytes).await.unwrap();
            }
        }
    });
    addr
}

fn reply(req: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::response(req.metadata.id, req.metadata.op_code);
    m.metadata.response_code = rcode;
    m.add_queries(req.queries.clone());
    m
}

#[tokio::test]
async fn answers_map_to_kinds() {
    let c = changes();
    for (rc, kind) in [
        (ResponseCode::Refused, DnsErrorKind::Auth),
        (ResponseCode::NotAuth, DnsErrorKind::ZoneNotFound),
        (ResponseCode::NotZone, DnsErrorKind::ZoneNotFound),
        (ResponseCode::ServFail, DnsErrorKind::Unreachable),
        (ResponseCode::YXRRSet, DnsErrorKind::Rejected),
    ] {
        let addr = fake_server(move |req| {
            assert_eq!(req.metadata.op_code, OpCode::Update);
            assert_eq!(req.updates().len(), 4);
            assert!(req.signature().is_none());
            Some(reply(&req, rc))
        })
        .await;
        let e = Rfc2136::unsigned(addr)
            .apply("example.test", &c)
            .await
            .unwrap_err();
        assert_eq!(e.kind, kind, "{rc:?}: {e}");
        assert!(e.message.contains(&rcode_name(rc)), "{e}");
    }
    let addr = fake_server(|req| Some(reply(&req, ResponseCode::NoError))).await;
    Rfc2136::unsigned(addr)
        .apply("example.test", &c)
        .await
        .unwrap();
    // nothing to do: no connection at all
    Rfc2136::unsigned("127.0.0.1:1".parse().unwrap())
        .apply("example.test", &Changes::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn rejected_signature_is_auth_and_unsigned_success_is_not_trusted() {
    let c = changes();
    // NOTAUTH + TSIG BADSIG without a MAC, as RFC 8945 5.3.2 has it: unverifiable, still Auth
    let addr = fake_server(|req| {
        let sig = req.signature().expect("the update is signed").clone();
        assert_eq!(sig.name.to_ascii(), "ddns-key.");
        let mut m = reply(&req, ResponseCode::NotAuth);
        let t = TSIG::new(
            sig.data.algorithm.clone(),
            sig.data.time,
            sig.data.fudge,
            Vec::new(),
            sig.data.oid,
            Some(TsigError::BadSig),
            Vec::new(),
        );
        m.set_signature(Box::new(make_tsig_record(sig.name.clone(), t)));
        Some(m)
    })
    .await;
    let p = Rfc2136::new(addr, "ddns-key", "hmac-sha256", SECRET).unwrap();
    let e = p.apply("example.test", &c).await.unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Auth, "{e}");
    assert!(
        e.message.contains("BADSIG") && e.message.contains("NOTAUTH"),
        "{e}"
    );

    // an unsigned NOERROR to a signed update is not a success
    let addr = fake_server(|req| Some(reply(&req, ResponseCode::NoError))).await;
    let p = Rfc2136::new(addr, "ddns-key", "hmac-sha256", SECRET).unwrap();
    let e = p.apply("example.test", &c).await.unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Auth, "{e}");
    assert!(
        e.message.contains("NOERROR") && e.message.contains("not signed"),
        "{e}"
    );
}

#[tokio::test]
async fn no_server_or_no_answer_is_unreachable() {
    let c = changes();
    // a port nobody listens on
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = Rfc2136::unsigned(addr)
        .apply("example.test", &c)
        .await
        .unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Unreachable, "{e}");
    let e = Rfc2136::unsigned(addr)
        .records("example.test", "example.test")
        .await
        .unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Unreachable, "{e}");

    // a server that never answers
    let addr = fake_server(|_| None).await;
    let t0 = std::time::Instant::now();
    let e = Rfc2136::unsigned(addr)
        .with_timeout(Duration::from_millis(300))
        .apply("example.test", &c)
        .await
        .unwrap_err();
    assert_eq!(e.kind, DnsErrorKind::Unreachable, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}
