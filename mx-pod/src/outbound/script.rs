//! A scripted SMTP server on cue, for tests: a well-behaved ESMTP server by default, each of
//! whose steps can be made slow, silent, wrong or a hang-up. The outbound client's tests and
//! replay's use it.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// What the scripted server does in answer to one step.
#[derive(Clone)]
pub(crate) enum Answer {
    /// These bytes, in one write.
    Send(Vec<u8>),
    /// These bytes, one write per byte.
    Trickle(Vec<u8>),
    /// These bytes after a pause (virtual time under a paused clock).
    Late(Duration, Vec<u8>),
    /// These bytes, then nothing more is read or written; the connection stays open.
    Stall(Vec<u8>),
    /// These bytes, then the server hangs up.
    Last(Vec<u8>),
    /// Nothing; the server reads on.
    Silence,
    /// The server hangs up.
    Close,
}

/// The answer to a command the scripted server does not know.
const NOT_RECOGNIZED: &[u8] = b"502 5.5.2 Error: command not recognized\r\n";

pub(crate) fn send(bytes: &[u8]) -> Answer {
    Answer::Send(bytes.to_vec())
}

/// The scripted server's answer to each step; the default is a well-behaved ESMTP server.
#[derive(Clone)]
pub(crate) struct Script {
    pub greeting: Answer,
    pub ehlo: Answer,
    pub mail: Answer,
    pub rcpt: Answer,
    pub data: Answer,
    pub dot: Answer,
    /// The answer to `STARTTLS`; no TLS handshake follows (the default refuses the command).
    pub starttls: Answer,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: send(b"220 p.test ESMTP\r\n"),
            ehlo: send(b"250-p.test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"),
            mail: send(b"250 2.1.0 Ok\r\n"),
            rcpt: send(b"250 2.1.5 Ok\r\n"),
            data: send(b"354 End data with <CR><LF>.<CR><LF>\r\n"),
            dot: send(b"250 2.0.0 Ok: queued\r\n"),
            starttls: send(NOT_RECOGNIZED),
        }
    }
}

impl Script {
    /// The default server without PIPELINING: every command waits for its reply.
    pub fn lockstep() -> Self {
        Script {
            ehlo: send(b"250-p.test\r\n250 SIZE 1000000\r\n"),
            ..Script::default()
        }
    }
}

/// What the scripted server saw: the commands in order, the final dots it received, and on TCP
/// the connections it accepted.
#[derive(Default, Debug)]
pub(crate) struct Seen {
    pub connections: usize,
    pub commands: Vec<String>,
    pub dots: usize,
    /// The `MAIL FROM` line of each message whose final dot arrived, in the order they did.
    pub committed: Vec<String>,
}

/// Plays `script` on one connection. Returns when the client or the script hangs up.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    script: Script,
    seen: Arc<Mutex<Seen>>,
) {
    /// `false`: the connection is over.
    async fn answer<W: AsyncWrite + Unpin>(w: &mut W, a: &Answer) -> bool {
        let ok = match a {
            Answer::Send(b) => w.write_all(b).await.is_ok(),
            Answer::Trickle(b) => {
                let mut ok = true;
                for byte in b {
                    ok &= w.write_all(&[*byte]).await.is_ok() && w.flush().await.is_ok();
                }
                ok
            }
            Answer::Late(after, b) => {
                tokio::time::sleep(*after).await;
                w.write_all(b).await.is_ok()
            }
            Answer::Stall(b) => {
                let _ = w.write_all(b).await;
                std::future::pending::<()>().await;
                false
            }
            Answer::Last(b) => {
                let _ = w.write_all(b).await;
                false
            }
            Answer::Silence => true,
            Answer::Close => false,
        };
        ok && w.flush().await.is_ok()
    }
    let mut r = BufReader::new(stream);
    if !answer(r.get_mut(), &script.greeting).await {
        return;
    }
    let mut line = Vec::new();
    let mut mail = String::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let cmd = String::from_utf8_lossy(&line).trim_end().to_owned();
        seen.lock().unwrap().commands.push(cmd.clone());
        let verb = cmd.get(..4).unwrap_or("").to_ascii_uppercase();
        if verb == "MAIL" {
            mail = cmd.clone();
        }
        let a = match verb.as_str() {
            "EHLO" | "HELO" => script.ehlo.clone(),
            "MAIL" => script.mail.clone(),
            "RCPT" => script.rcpt.clone(),
            "DATA" => script.data.clone(),
            "STAR" => script.starttls.clone(),
            "RSET" => send(b"250 2.0.0 Ok\r\n"),
            "QUIT" => {
                let _ = r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            _ => send(NOT_RECOGNIZED),
        };
        if !answer(r.get_mut(), &a).await {
            return;
        }
        let data_accepted = match &a {
            Answer::Send(b) | Answer::Trickle(b) | Answer::Late(_, b) => b.starts_with(b"354"),
            _ => false,
        };
        if verb == "DATA" && data_accepted {
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == b".\r\n" {
                    break;
                }
            }
            {
                let mut seen = seen.lock().unwrap();
                seen.dots += 1;
                seen.committed.push(mail.clone());
            }
            if !answer(r.get_mut(), &script.dot).await {
                return;
            }
        }
    }
}

/// The scripted server on 127.0.0.1, for any number of connections.
pub(crate) async fn scripted(script: Script) -> (String, Arc<Mutex<Seen>>) {
    let (addr, seen, _) = scripted_live(script).await;
    (addr, seen)
}

/// [`scripted`], with its script behind a lock: a change applies to the connections accepted
/// after it.
pub(crate) async fn scripted_live(
    script: Script,
) -> (String, Arc<Mutex<Seen>>, Arc<Mutex<Script>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let script = Arc::new(Mutex::new(script));
    let (s, live) = (seen.clone(), script.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            let _ = stream.set_nodelay(true);
            s.lock().unwrap().connections += 1;
            let script = live.lock().unwrap().clone();
            tokio::spawn(serve(stream, script, s.clone()));
        }
    });
    (addr, seen, script)
}
