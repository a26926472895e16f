//! A raw HTTP/2 client that ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS, as an
//! attacker opening thousands of streams on one connection would: it writes the frames itself
//! (preface, SETTINGS, HEADERS with literal HPACK fields) and reads the server's frames back,
//! so a test sees exactly what the server advertises and which streams it refuses.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types used here: DATA.
const DATA: u8 = 0x0;
/// HEADERS.
pub const HEADERS: u8 = 0x1;
/// RST_STREAM.
pub const RST_STREAM: u8 = 0x3;
/// SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// The SETTINGS parameter SETTINGS_MAX_CONCURRENT_STREAMS.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// The RST_STREAM code REFUSED_STREAM.
pub const REFUSED_STREAM: u32 = 0x7;
/// Flags: END_STREAM (DATA, HEADERS), ACK (SETTINGS), END_HEADERS (HEADERS).
pub const END_STREAM: u8 = 0x1;
/// ACK.
const ACK: u8 = 0x1;
/// END_HEADERS.
const END_HEADERS: u8 = 0x4;

/// One frame the server sent.
#[derive(Debug)]
pub struct Frame {
    /// Its type.
    pub kind: u8,
    /// Its flags.
    pub flags: u8,
    /// The stream it is on (0: the connection).
    pub stream: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A connection speaking HTTP/2 by hand.
pub struct RawH2 {
    /// The TCP connection.
    tcp: TcpStream,
}

impl RawH2 {
    /// Connects to `addr` and sends the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(PREFACE).await.expect("preface");
        let mut raw = RawH2 { tcp };
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    /// Writes one frame.
    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let length = u32::try_from(payload.len()).expect("small frame");
        let mut frame = length.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.tcp.write_all(&frame).await.expect("write a frame");
    }

    /// The next frame, or `None` when the server closed the connection or sent nothing
    /// within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let read = async {
            let mut head = [0u8; 9];
            self.tcp.read_exact(&mut head).await.ok()?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            let mut payload = vec![0; usize::try_from(length).ok()?];
            self.tcp.read_exact(&mut payload).await.ok()?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            Some(Frame {
                kind: head[3],
                flags: head[4],
                stream,
                payload,
            })
        };
        tokio::time::timeout(wait, read).await.ok().flatten()
    }

    /// Reads frames up to the server's first SETTINGS (acknowledging it) and gives the
    /// SETTINGS_MAX_CONCURRENT_STREAMS it advertises, if any.
    pub async fn server_max_streams(&mut self, wait: Duration) -> Option<u32> {
        loop {
            let frame = self.next(wait).await.expect("the server's SETTINGS");
            if frame.kind != SETTINGS || frame.flags & ACK != 0 {
                continue;
            }
            self.send(SETTINGS, ACK, 0, &[]).await;
            return frame.payload.chunks_exact(6).find_map(|setting| {
                (u16::from_be_bytes([setting[0], setting[1]]) == MAX_CONCURRENT_STREAMS)
                    .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
            });
        }
    }

    /// Opens stream `stream` (odd) with the headers of a gRPC call to `path` and `extra`
    /// ones, the request body left open, so the stream stays open on the server.
    pub async fn open_call(
        &mut self,
        stream: u32,
        authority: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) {
        let mut block = Vec::new();
        let fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        for (name, value) in fields.iter().chain(extra) {
            literal(&mut block, name, value);
        }
        self.send(HEADERS, END_HEADERS, stream, &block).await;
    }

    /// Sends the request message of stream `stream`, an empty protobuf message (every field
    /// at its default), and ends the request.
    pub async fn send_empty_message(&mut self, stream: u32) {
        // gRPC framing: not compressed, length 0.
        self.send(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]).await;
    }
}

/// A header field as an HPACK literal without indexing, new name, no Huffman (RFC 7541 §6.2.2):
/// both strings must be under 127 bytes.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    for text in [name, value] {
        block.push(
            u8::try_from(text.len())
                .ok()
                .filter(|&n| n < 127)
                .expect("short"),
        );
        block.extend(text.as_bytes());
    }
}

/// The error code of a RST_STREAM frame.
pub fn reset_code(frame: &Frame) -> Option<u32> {
    let code: [u8; 4] = frame.payload.get(..4)?.try_into().ok()?;
    (frame.kind == RST_STREAM).then(|| u32::from_be_bytes(code))
}
