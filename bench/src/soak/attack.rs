//! The attackers that speak raw HTTP/1.1 to the proxy, each one connection at a time until
//! its phase's deadline, reconnecting whenever the proxy cuts it:
//! - [`slowloris`]: sends a request line, then one byte of a header every interval and never
//!   ends the head, so a proxy without a head deadline keeps the connection (and a slot)
//!   forever. The proxy's `--header-read-timeout` is what should cut it.
//! - [`slow_upload`]: sends a whole `POST /cart/add` head announcing a large body, then one
//!   byte of it every interval. The proxy streams such a body to a backend, so a proxy that
//!   waits forever ties a backend connection up; `--body-read-timeout` and
//!   `--min-upload-rate` should end it with a 408, never held against the backend.
//!
//! Whatever the proxy writes back is read: a response's status is counted (408 apart), then
//! the connection is dropped and a new one made. Every wait is bounded by the deadline.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until, timeout_at};

/// Pause before reconnecting when the proxy cut or refused a connection within
/// [`QUICK_CUT`] of opening it: an attacker that is refused at once must not spin.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// See [`RECONNECT_PAUSE`].
const QUICK_CUT: Duration = Duration::from_secs(1);

/// What one slowloris connection slot saw over a phase.
#[derive(Debug, Default, Clone)]
pub(crate) struct SlowlorisTally {
    opened: u64,
    connect_failed: u64,
    cut: u64,
    answered_408: u64,
    open_at_end: u64,
}

/// What the slowloris attackers got.
#[derive(Debug, Clone, Serialize)]
pub struct SlowlorisReport {
    /// Connections kept open at once.
    pub clients: usize,
    /// Pause between two bytes of a head.
    #[serde(serialize_with = "super::duration_text")]
    pub interval: Duration,
    /// Connections opened over the phase.
    pub opened: u64,
    /// Connections that failed to open (refused, or not accepted in time).
    pub connect_failed: u64,
    /// Connections the proxy ended (an answer, a close or a reset) before the phase did.
    pub cut: u64,
    /// Of those, the ones it answered 408 first.
    pub answered_408: u64,
    /// Connections still open, head unfinished, when the phase ended.
    pub open_at_end: u64,
}

impl SlowlorisReport {
    pub(crate) fn new(clients: usize, interval: Duration) -> SlowlorisReport {
        SlowlorisReport {
            clients,
            interval,
            opened: 0,
            connect_failed: 0,
            cut: 0,
            answered_408: 0,
            open_at_end: 0,
        }
    }

    pub(crate) fn add(&mut self, tally: &SlowlorisTally) {
        self.opened += tally.opened;
        self.connect_failed += tally.connect_failed;
        self.cut += tally.cut;
        self.answered_408 += tally.answered_408;
        self.open_at_end += tally.open_at_end;
    }
}

/// What one slow uploader saw over a phase.
#[derive(Debug, Default, Clone)]
pub(crate) struct UploadTally {
    opened: u64,
    connect_failed: u64,
    answered_408: u64,
    answered_other: u64,
    cut_without_answer: u64,
    open_at_end: u64,
}

/// What the slow uploaders got.
#[derive(Debug, Clone, Serialize)]
pub struct UploadReport {
    /// Uploaders at once.
    pub clients: usize,
    /// The `Content-Length` each announced.
    pub announced_bytes: u64,
    /// Pause between two bytes of a body.
    #[serde(serialize_with = "super::duration_text")]
    pub interval: Duration,
    /// Uploads started (connections opened).
    pub opened: u64,
    /// Connections that failed to open.
    pub connect_failed: u64,
    /// Uploads answered 408 (the proxy's slow-client limits).
    pub answered_408: u64,
    /// Uploads answered with another status.
    pub answered_other: u64,
    /// Uploads whose connection was closed or reset without an answer.
    pub cut_without_answer: u64,
    /// Uploads still trickling when the phase ended.
    pub open_at_end: u64,
}

impl UploadReport {
    pub(crate) fn new(clients: usize, announced_bytes: u64, interval: Duration) -> UploadReport {
        UploadReport {
            clients,
            announced_bytes,
            interval,
            opened: 0,
            connect_failed: 0,
            answered_408: 0,
            answered_other: 0,
            cut_without_answer: 0,
            open_at_end: 0,
        }
    }

    pub(crate) fn add(&mut self, tally: &UploadTally) {
        self.opened += tally.opened;
        self.connect_failed += tally.connect_failed;
        self.answered_408 += tally.answered_408;
        self.answered_other += tally.answered_other;
        self.cut_without_answer += tally.cut_without_answer;
        self.open_at_end += tally.open_at_end;
    }
}

/// How one trickling connection ended.
enum Ending {
    /// The phase ended first.
    PhaseOver,
    /// The proxy answered with this status (then the connection is dropped).
    Answered(u16),
    /// The proxy closed or reset the connection without an answer.
    Cut,
}

/// A connection to `target`, from `source` when given (bound first, any port), within the
/// deadline; `None` when it failed or the deadline came first.
async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    deadline: Instant,
) -> Option<std::io::Result<TcpStream>> {
    let attempt = async {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(target).await
    };
    timeout_at(deadline, attempt).await.ok()
}

/// Writes `head`, then one byte of `trickle` every `interval`, until the proxy answers or
/// cuts the connection, or `deadline`.
async fn trickle(
    stream: TcpStream,
    head: &[u8],
    mut trickle: impl Iterator<Item = u8>,
    interval: Duration,
    deadline: Instant,
) -> Ending {
    let (mut reader, mut writer) = stream.into_split();
    let answer = async {
        let mut buffer = [0u8; 256];
        let mut read = 0;
        // The status line's first 12 bytes (`HTTP/1.1 408`) are enough.
        while read < 12 {
            match reader.read(&mut buffer[read..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
        status_of(&buffer[..read])
    };
    let send = async {
        if writer.write_all(head).await.is_err() {
            return;
        }
        let mut next = Instant::now() + interval;
        loop {
            sleep_until(next).await;
            let byte = trickle.next().unwrap_or(b'a');
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            next += interval;
        }
    };
    tokio::select! {
        status = answer => match status {
            Some(status) => Ending::Answered(status),
            None => Ending::Cut,
        },
        // The writer only stops on a write error: the proxy is gone; its answer, if any,
        // is not waited for.
        () = send => Ending::Cut,
        () = sleep_until(deadline) => Ending::PhaseOver,
    }
}

/// The status of an `HTTP/1.x NNN` status line at the start of `bytes`.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    let code = text.strip_prefix("HTTP/1.")?.get(2..5)?;
    code.parse().ok()
}

/// Sleeps [`RECONNECT_PAUSE`] (bounded by `deadline`) when the connection opened at `opened`
/// ended within [`QUICK_CUT`].
async fn pause_if_quick(opened: Instant, deadline: Instant) {
    if opened.elapsed() < QUICK_CUT {
        sleep_until((Instant::now() + RECONNECT_PAUSE).min(deadline)).await;
    }
}

/// One slowloris slot: a connection to `target` sending a request head one byte per
/// `interval`, made again whenever the proxy cuts it, until `deadline`.
pub(crate) async fn slowloris(
    target: SocketAddr,
    source: Option<IpAddr>,
    interval: Duration,
    deadline: Instant,
) -> SlowlorisTally {
    let mut tally = SlowlorisTally::default();
    let head = format!("GET /me HTTP/1.1\r\nHost: {target}\r\nX-Slowloris: ");
    while Instant::now() < deadline {
        let stream = match connect(target, source, deadline).await {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::debug!(%error, "slowloris connect failed");
                tally.connect_failed += 1;
                sleep_until((Instant::now() + RECONNECT_PAUSE).min(deadline)).await;
                continue;
            }
        };
        tally.opened += 1;
        let opened = Instant::now();
        let filler = std::iter::repeat(b'a');
        match trickle(stream, head.as_bytes(), filler, interval, deadline).await {
            Ending::PhaseOver => tally.open_at_end += 1,
            Ending::Answered(status) => {
                tally.cut += 1;
                if status == 408 {
                    tally.answered_408 += 1;
                }
            }
            Ending::Cut => tally.cut += 1,
        }
        pause_if_quick(opened, deadline).await;
    }
    tally
}

/// One slow uploader: `POST /cart/add` announcing `length` bytes, sent one byte per
/// `interval`, started again whenever the proxy ends it, until `deadline`.
pub(crate) async fn slow_upload(
    target: SocketAddr,
    source: Option<IpAddr>,
    length: u64,
    interval: Duration,
    deadline: Instant,
) -> UploadTally {
    let mut tally = UploadTally::default();
    let head = format!(
        "POST /cart/add HTTP/1.1\r\nHost: {target}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {length}\r\n\r\n"
    );
    while Instant::now() < deadline {
        let stream = match connect(target, source, deadline).await {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::debug!(%error, "slow uploader connect failed");
                tally.connect_failed += 1;
                sleep_until((Instant::now() + RECONNECT_PAUSE).min(deadline)).await;
                continue;
            }
        };
        tally.opened += 1;
        let opened = Instant::now();
        // `item=aaaa…`: a form the demo would take, if it ever arrived whole.
        let body = b"item=".iter().copied().chain(std::iter::repeat(b'a'));
        let body = body.take(usize::try_from(length).unwrap_or(usize::MAX));
        match trickle(stream, head.as_bytes(), body, interval, deadline).await {
            Ending::PhaseOver => tally.open_at_end += 1,
            Ending::Answered(408) => tally.answered_408 += 1,
            Ending::Answered(status) => {
                tracing::debug!(status, "a slow upload was answered");
                tally.answered_other += 1;
            }
            Ending::Cut => tally.cut_without_answer += 1,
        }
        pause_if_quick(opened, deadline).await;
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_read_from_a_status_line_and_nothing_else() {
        assert_eq!(status_of(b"HTTP/1.1 408 Request Timeout\r\n"), Some(408));
        assert_eq!(status_of(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_of(b"HTTP/1.1 40"), None);
        assert_eq!(status_of(b""), None);
        assert_eq!(status_of(b"SSH-2.0-OpenSSH_9"), None);
    }

    /// A server that reads a little and answers 408 ends a slow upload with a 408; one that
    /// closes at once is a cut.
    #[tokio::test]
    async fn a_408_and_a_silent_close_are_told_apart() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut answered, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 64];
            let _ = answered.read(&mut head).await;
            answered
                .write_all(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let (closed, _) = listener.accept().await.unwrap();
            drop(closed);
            // Keeps the listener (and the answered connection) until the uploader is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(answered);
        });
        let deadline = Instant::now() + Duration::from_millis(1500);
        let tally = slow_upload(target, None, 100, Duration::from_millis(50), deadline).await;
        server.abort();
        assert!(tally.opened >= 2, "{tally:?}");
        assert_eq!(tally.answered_408, 1, "{tally:?}");
        assert!(tally.cut_without_answer >= 1, "{tally:?}");
    }
}
