//! The WebSocket wire of one connection, server side (RFC 6455), holding no buffer while idle.
//!
//! Why not tungstenite's `WebSocket`: its codec keeps a read buffer and a write buffer for the
//! life of the connection (the read buffer at its configured size, the write buffer at the size
//! of the largest batch ever written, since a `Vec` keeps its capacity), plus two waker proxies
//! and the boxed upgraded I/O: about 1.4 KB per idle connection, measured, when the whole
//! connection's budget is 3 KB. Here a connection holds bytes only while a frame is partly read
//! or a write is partly done; both buffers are given back as soon as they are empty.
//!
//! tungstenite's frame header codec ([`FrameHeader`]) parses and formats headers; this module
//! adds what the connection needs around it: unmasking, reassembly of fragmented messages,
//! control frames (a ping is answered with a pong, a close with a close), UTF-8 checks of text
//! messages, and the size limit. Extensions (compression) are not negotiated, so frames with a
//! reserved bit set are protocol violations, as are unmasked client frames.
//!
//! Every `async` method is cancel safe: its progress lives in the struct, so the connection's
//! `select!` may drop a `recv` whenever another branch wins.

use std::io::{self, Cursor};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    Text(String),
    Binary,
    Ping,
    Pong,
    /// The client's close frame: the answer is queued (written by the next [`WsStream::flush`]).
    Close,
}

/// Why a frame was refused. After any of these the stream yields no further messages; it
/// reads and drops input until the peer closes, so that a close frame written meanwhile is not
/// lost to a reset.
#[derive(Debug)]
pub(crate) enum WireError {
    /// A frame or message over the size limit.
    TooBig,
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// Anything else RFC 6455 forbids (unmasked client frame, reserved bits or opcodes, a bad
    /// control frame, a continuation without a start).
    Protocol,
    Io(io::Error),
}

/// Where reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The client closed, or broke the protocol: input is read and dropped.
    Discarding,
    /// The peer's end of the stream.
    Eof,
}

/// Bytes read at most per `read` (on the stack; a larger frame takes several reads).
const READ_CHUNK: usize = 4096;

/// Frames queued by [`WsStream::feed`] are written once they reach this many bytes (and at each
/// [`WsStream::flush`]).
pub(crate) struct WireLimits {
    /// Most bytes of one message (all its frames), and so of one frame.
    pub max_message_bytes: usize,
    /// Queued output written before more is queued.
    pub write_batch_bytes: usize,
}

/// One WebSocket connection over TCP.
pub(crate) struct WsStream {
    io: TcpStream,
    /// Bytes read and not yet taken as frames (from `rpos`); empty, unallocated, while idle.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Frames queued and not yet written (from `wpos`); empty, unallocated, while idle.
    wbuf: Vec<u8>,
    wpos: usize,
    /// A fragmented message being reassembled: text or not, and its bytes so far (boxed: rare).
    partial: Option<Box<(bool, Vec<u8>)>>,
    max_message: u32,
    write_batch: u32,
    state: ReadState,
}

impl WsStream {
    /// The stream of an upgraded connection; `read` holds what arrived after the handshake.
    pub fn new(io: TcpStream, read: Bytes, limits: &WireLimits) -> WsStream {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        WsStream {
            io,
            rbuf: read.to_vec(),
            rpos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            partial: None,
            max_message: clamp(limits.max_message_bytes),
            write_batch: clamp(limits.write_batch_bytes),
            state: ReadState::Open,
        }
    }

    /// The next message; `None` at the end of the stream. After an error, none follow: the
    /// stream then drops what it reads until the end.
    pub async fn recv(&mut self) -> Option<Result<Incoming, WireError>> {
        loop {
            if self.state == ReadState::Open {
                match self.parse() {
                    Ok(Some(m)) => {
                        if self.rpos == self.rbuf.len() {
                            self.compact();
                        }
                        return Some(Ok(m));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.state = ReadState::Discarding;
                        self.rbuf = Vec::new();
                        self.rpos = 0;
                        self.partial = None;
                        return Some(Err(e));
                    }
                }
            }
            if self.state == ReadState::Eof {
                return None;
            }
            // Readiness polled, not awaited through `readable()`: that future holds a waiter
            // node (152 B) in every idle connection's task; this one holds a reference.
            if let Err(e) = std::future::poll_fn(|cx| self.io.poll_read_ready(cx)).await {
                self.state = ReadState::Eof;
                return Some(Err(WireError::Io(e)));
            }
            let read = self.read_some();
            match read {
                Ok(0) => {
                    self.state = ReadState::Eof;
                    self.rbuf = Vec::new();
                    self.rpos = 0;
                    return None;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.state = ReadState::Eof;
                    return Some(Err(WireError::Io(e)));
                }
            }
        }
    }

    /// Reads what the socket has (without waiting) into the read buffer, or drops it when the
    /// stream no longer takes messages. Reads go through a buffer on the stack, so the read
    /// buffer grows only by the bytes that arrived: nothing is reserved ahead while waiting.
    fn read_some(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.io.try_read(&mut chunk)?;
        if self.state == ReadState::Open {
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
        Ok(n)
    }

    /// Takes the next whole message out of the read buffer, if it holds one.
    fn parse(&mut self) -> Result<Option<Incoming>, WireError> {
        loop {
            let available = &self.rbuf[self.rpos..];
            let mut cursor = Cursor::new(available);
            let Some((header, length)) =
                FrameHeader::parse(&mut cursor).map_err(|_| WireError::Protocol)?
            else {
                self.compact();
                return Ok(None);
            };
            let header_len = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(WireError::Protocol);
            }
            let Some(mask) = header.mask else {
                return Err(WireError::Protocol);
            };
            let control = match header.opcode {
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(WireError::Protocol);
                }
                OpCode::Control(_) => true,
                OpCode::Data(_) => false,
            };
            if control && (!header.is_final || length > 125) {
                return Err(WireError::Protocol);
            }
            let so_far = self.partial.as_ref().map_or(0, |p| p.1.len() as u64);
            if length.saturating_add(so_far) > u64::from(self.max_message) {
                return Err(WireError::TooBig);
            }
            // Bounded by the check above.
            let length = length as usize;
            if available.len() < header_len + length {
                self.compact();
                return Ok(None);
            }
            let start = self.rpos + header_len;
            let end = start + length;
            self.rpos = end;
            let payload = &mut self.rbuf[start..end];
            unmask(payload, mask);
            let payload = &self.rbuf[start..end];
            match header.opcode {
                OpCode::Control(Control::Ping) => {
                    // Answered at once when the socket takes it, else with the next flush.
                    let pong = payload.to_vec();
                    self.queue_frame(OpCode::Control(Control::Pong), &pong);
                    self.try_write();
                    return Ok(Some(Incoming::Ping));
                }
                OpCode::Control(Control::Pong) => return Ok(Some(Incoming::Pong)),
                OpCode::Control(_) => {
                    // A close: its status code (if any) is echoed, as RFC 6455 §5.5.1 asks.
                    let echo = match payload.len() {
                        0 => Vec::new(),
                        1 => return Err(WireError::Protocol),
                        _ => payload[..2].to_vec(),
                    };
                    self.queue_frame(OpCode::Control(Control::Close), &echo);
                    self.state = ReadState::Discarding;
                    self.rbuf = Vec::new();
                    self.rpos = 0;
                    self.partial = None;
                    return Ok(Some(Incoming::Close));
                }
                OpCode::Data(Data::Continue) => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(WireError::Protocol);
                    };
                    partial.1.extend_from_slice(payload);
                    if header.is_final {
                        let (text, bytes) = *self.partial.take().expect("checked above");
                        return message(text, bytes).map(Some);
                    }
                }
                OpCode::Data(kind) => {
                    if self.partial.is_some() {
                        return Err(WireError::Protocol);
                    }
                    let text = kind == Data::Text;
                    if header.is_final {
                        return message(text, payload.to_vec()).map(Some);
                    }
                    self.partial = Some(Box::new((text, payload.to_vec())));
                }
            }
        }
    }

    /// Drops the bytes already taken; gives the buffer back when nothing is left in it.
    fn compact(&mut self) {
        if self.rpos == self.rbuf.len() {
            self.rbuf = Vec::new();
        } else if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
        }
        self.rpos = 0;
    }

    /// Queues a text frame; writes what is queued first when that reached the write batch size.
    pub async fn feed(&mut self, text: &str) -> io::Result<()> {
        if self.wbuf.len() - self.wpos >= self.write_batch as usize {
            self.flush().await?;
        }
        self.queue_frame(OpCode::Data(Data::Text), text.as_bytes());
        Ok(())
    }

    /// Queues a ping (the heartbeat).
    pub fn feed_ping(&mut self) {
        self.queue_frame(OpCode::Control(Control::Ping), &[]);
    }

    /// Queues a close frame with `code` and `reason` (at most 123 bytes, cut on a char
    /// boundary).
    pub fn feed_close(&mut self, code: u16, reason: &str) {
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = Vec::with_capacity(2 + cut);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        self.queue_frame(OpCode::Control(Control::Close), &payload);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            std::future::poll_fn(|cx| self.io.poll_write_ready(cx)).await?;
            match self.io.try_write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf = Vec::new();
        self.wpos = 0;
        Ok(())
    }

    /// Writes what the socket takes now, without waiting.
    fn try_write(&mut self) {
        while self.wpos < self.wbuf.len() {
            match self.io.try_write(&self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(_) => return,
            }
        }
        self.wbuf = Vec::new();
        self.wpos = 0;
    }

    fn queue_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let header = FrameHeader {
            is_final: true,
            opcode,
            ..FrameHeader::default()
        };
        let length = payload.len() as u64;
        self.wbuf.reserve(header.len(length) + payload.len());
        // Writing into a `Vec` cannot fail.
        let _ = header.format(length, &mut self.wbuf);
        self.wbuf.extend_from_slice(payload);
    }
}

/// A whole message of `bytes`.
fn message(text: bool, bytes: Vec<u8>) -> Result<Incoming, WireError> {
    if text {
        String::from_utf8(bytes)
            .map(Incoming::Text)
            .map_err(|_| WireError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary)
    }
}

/// Unmasks a client frame's payload (RFC 6455 §5.3), eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A client frame: masked, with `first` as its first byte (FIN, opcode).
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    const LIMITS: WireLimits = WireLimits {
        max_message_bytes: 1024,
        write_batch_bytes: 16 * 1024,
    };

    /// A server stream and the client's raw socket, over loopback.
    async fn pair() -> (WsStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (WsStream::new(server, Bytes::new(), &LIMITS), client)
    }

    #[test]
    fn unmasking_matches_the_bytewise_rule() {
        let mask = [1, 2, 3, 4];
        for len in 0..40 {
            let original: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut fast = original.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }

    #[tokio::test]
    async fn frames_split_across_reads_and_fragments_are_reassembled() {
        let (mut ws, mut client) = pair().await;
        // Handshake leftovers count: the first frame starts in the upgrade's read buffer.
        let mut bytes = client_frame(0x81, "héllo".as_bytes());
        bytes.extend(client_frame(0x01, b"one "));
        bytes.extend(client_frame(0x89, b"p")); // a ping between fragments
        bytes.extend(client_frame(0x80, b"two"));
        bytes.extend(client_frame(0x81, &[b'x'; 300]));
        for piece in bytes.chunks(7) {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Incoming::Text("héllo".into())
        );
        assert_eq!(ws.recv().await.unwrap().unwrap(), Incoming::Ping);
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Incoming::Text("one two".into())
        );
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Incoming::Text("x".repeat(300))
        );
        // Idle again: nothing held.
        assert_eq!(ws.rbuf.capacity(), 0);
        // The ping was answered with a pong carrying its payload.
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8a, 1, b'p']);
    }

    #[tokio::test]
    async fn refused_frames_are_typed_and_end_the_messages() {
        for (bytes, want) in [
            (client_frame(0x81, &[b'a'; 1025]), "TooBig"),
            (client_frame(0x81, &[0xff, 0xfe]), "InvalidUtf8"),
            (b"\x81\x02hi".to_vec(), "Protocol"),    // unmasked
            (client_frame(0xc1, b"hi"), "Protocol"), // RSV1 without an extension
            (client_frame(0x83, b"hi"), "Protocol"), // reserved opcode
            (client_frame(0x80, b"hi"), "Protocol"), // continuation without a start
            (client_frame(0x09, b"hi"), "Protocol"), // fragmented ping
        ] {
            let (mut ws, mut client) = pair().await;
            client.write_all(&bytes).await.unwrap();
            client
                .write_all(&client_frame(0x81, b"after"))
                .await
                .unwrap();
            let got = ws.recv().await.unwrap().unwrap_err();
            assert_eq!(format!("{got:?}"), want);
            // What follows is dropped until the peer closes.
            client.shutdown().await.unwrap();
            assert!(ws.recv().await.is_none(), "{want}: nothing after an error");
        }
    }

    #[tokio::test]
    async fn close_is_echoed_and_writes_leave_in_order() {
        let (mut ws, mut client) = pair().await;
        ws.feed("first").await.unwrap();
        ws.feed_ping();
        ws.flush().await.unwrap();
        assert_eq!(ws.wbuf.capacity(), 0);
        let mut got = [0u8; 9];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x05first\x89\x00");
        client
            .write_all(&client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']))
            .await
            .unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Incoming::Close);
        ws.flush().await.unwrap();
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [0x88, 2, 0x03, 0xe8]);
        ws.feed_close(4008, "é".repeat(70).as_str());
        ws.flush().await.unwrap();
        let mut close = vec![0u8; 2 + 2 + 122];
        client.read_exact(&mut close).await.unwrap();
        assert_eq!(&close[..4], &[0x88, 124, 0x0f, 0xa8]);
        assert!(std::str::from_utf8(&close[4..]).is_ok());
    }
}
