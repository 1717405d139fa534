//! The PROXY protocol (HAProxy's, v1 text and v2 binary) header a load balancer puts in front of
//! each connection, naming the real client. Parsed with the `ppp` crate. With
//! `smtp.proxy_protocol = true` every connection must start with one; its source address is then
//! the client address the filters, limits, logs and `Received:` header use.

use std::net::SocketAddr;

use ppp::{HeaderResult, PartialResult, v1, v2};

/// Longest header accepted (v1 is at most 107 bytes; v2 carries optional TLVs).
pub const MAX_HEADER: usize = 4096;

/// What a complete header said.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header took at the start of the stream.
    pub len: usize,
    /// The real client; `None` for `UNKNOWN`/`LOCAL` (a health check of the balancer itself).
    pub source: Option<SocketAddr>,
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, String> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        if buf.len() >= MAX_HEADER {
            return Err("PROXY header too long".into());
        }
        return Ok(None);
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Some(ProxyHeader {
                len: h.header.len(),
                source,
            }))
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Ok(Some(ProxyHeader {
                len: h.len(),
                source,
            }))
        }
        HeaderResult::V1(Err(e)) => Err(format!("bad PROXY v1 header: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("bad PROXY header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_header_gives_the_client_and_its_length() {
        let buf = b"PROXY TCP4 192.0.2.10 10.0.0.1 40000 25\r\nEHLO x\r\n";
        let h = parse(buf).unwrap().unwrap();
        assert_eq!(h.source, Some("192.0.2.10:40000".parse().unwrap()));
        assert_eq!(&buf[h.len..], b"EHLO x\r\n");
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.10 10.0").unwrap(),
            None,
            "incomplete"
        );
        let unknown = parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!(unknown.source, None);
    }

    #[test]
    fn v2_header_gives_the_client_and_its_length() {
        let mut buf = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, 0x11, 0x00, 0x0C, // v2 PROXY, TCP over IPv4, 12 bytes
            198, 51, 100, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x00, 0x19,
        ];
        buf.extend_from_slice(b"EHLO x\r\n");
        let h = parse(&buf).unwrap().unwrap();
        assert_eq!(h.source, Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(&buf[h.len..], b"EHLO x\r\n");
        assert_eq!(parse(&buf[..14]).unwrap(), None, "incomplete");
    }

    #[test]
    fn plain_smtp_is_refused() {
        assert!(parse(b"EHLO client.test\r\n").is_err());
    }
}
