//! The loop guard: a message that already passed through too many hosts is refused
//! (`554 5.4.6`) instead of being queued and sent round again.

use super::Verdict;
use crate::reply::RejectReason;

/// Counts `Received:` header fields in the header section of `message`.
pub fn received_count(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

/// Refuses a message with more than `max` `Received:` headers.
pub fn check(message: &[u8], max: usize) -> Verdict {
    if received_count(message) > max {
        Verdict::Reject(RejectReason::Loop)
    } else {
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_header_section() {
        let msg =
            b"Received: a\r\nRECEIVED: b\r\n\tcontinued\r\nSubject: x\r\n\r\nReceived: in body\r\n";
        assert_eq!(received_count(msg), 2);
    }

    #[test]
    fn over_limit_is_a_loop() {
        let mut msg = Vec::new();
        for _ in 0..3 {
            msg.extend_from_slice(b"Received: hop\r\n");
        }
        msg.extend_from_slice(b"\r\nbody\r\n");
        assert_eq!(check(&msg, 3), Verdict::Accept);
        assert_eq!(check(&msg, 2), Verdict::Reject(RejectReason::Loop));
    }
}
