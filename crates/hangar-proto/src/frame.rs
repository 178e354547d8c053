//! Framing: header layout, encoding and a resynchronising reader.

use std::io::{self, Read, Write};

/// Every frame starts with these bytes.
pub const MAGIC: [u8; 4] = *b"HGRF";

/// Largest payload either side accepts. Output is sent in chunks well below
/// this; a larger length in a header means the stream is corrupt.
pub const MAX_PAYLOAD: u32 = 1 << 20;

const HEADER_LEN: usize = 4 + 1 + 4 + 4;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// JSON `HostMessage`, host to guest.
    Host = 1,
    /// JSON `GuestMessage`, guest to host.
    Guest = 2,
    /// Raw stdout bytes of the exec `stream`.
    Stdout = 3,
    /// Raw stderr bytes of the exec `stream`.
    Stderr = 4,
    /// Raw stdin bytes for the exec `stream`, host to guest.
    Stdin = 5,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Host),
            2 => Some(Self::Guest),
            3 => Some(Self::Stdout),
            4 => Some(Self::Stderr),
            5 => Some(Self::Stdin),
            _ => None,
        }
    }
}

/// One unit on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    /// Exec id for data frames and exec-related messages; 0 otherwise.
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed or ended.
    #[error("agent channel I/O failed")]
    Io(#[from] io::Error),
    /// The stream ended cleanly between frames.
    #[error("agent channel closed")]
    Closed,
    /// A header named a payload larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: u32 },
    /// A header carried a kind byte this version does not know.
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    /// A control frame's JSON did not decode.
    #[error("malformed {what} message")]
    BadMessage {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A frame of one kind arrived where another was expected.
    #[error("expected a {expected} frame, got {got:?}")]
    UnexpectedKind {
        expected: &'static str,
        got: FrameKind,
    },
}

impl Frame {
    /// Encodes header and payload into one buffer, so a single `write_all`
    /// puts the whole frame on the wire (writers share one channel).
    ///
    /// # Panics
    /// If the payload exceeds [`MAX_PAYLOAD`]: a programming error, since
    /// callers chunk their data.
    pub fn encode(&self) -> Vec<u8> {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|len| *len <= MAX_PAYLOAD)
            .expect("frame payload over MAX_PAYLOAD: callers must chunk");
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Writes the frame in one call.
    pub fn write_to(&self, writer: &mut impl Write) -> io::Result<()> {
        writer.write_all(&self.encode())?;
        writer.flush()
    }
}

/// Turns bytes, pushed in pieces of any size, into frames. Bytes before a
/// magic are skipped; a header with an unknown kind or an oversized length
/// is reported once and the search for the next magic resumes after it.
/// Nothing buffered is lost when the source has no more bytes yet.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    skipped: u64,
}

impl FrameDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes discarded so far while looking for a frame start.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// True when no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next complete frame, or None until more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match self.buf.windows(MAGIC.len()).position(|w| w == MAGIC) {
            Some(pos) => self.discard(pos),
            None => {
                // Keep a tail that may be the start of a magic.
                let keep = (1..MAGIC.len())
                    .rev()
                    .find(|n| self.buf.len() >= *n && self.buf.ends_with(&MAGIC[..*n]))
                    .unwrap_or(0);
                self.discard(self.buf.len() - keep);
                return Ok(None);
            }
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let Some(kind) = FrameKind::from_byte(self.buf[4]) else {
            let kind = self.buf[4];
            self.discard(MAGIC.len());
            return Err(FrameError::UnknownKind { kind });
        };
        let field = |at: usize| {
            u32::from_le_bytes([
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ])
        };
        let stream = field(5);
        let len = field(9);
        if len > MAX_PAYLOAD {
            self.discard(MAGIC.len());
            return Err(FrameError::TooLarge { len });
        }
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }

    fn discard(&mut self, n: usize) {
        self.skipped += n as u64;
        self.buf.drain(..n);
    }
}

/// Reads frames from a byte stream through a [`FrameDecoder`]. A read error
/// (such as a timeout) leaves buffered bytes in place for the next call.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    chunk: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::default(),
            chunk: vec![0u8; 64 * 1024],
        }
    }

    /// Bytes discarded so far while looking for a frame start.
    pub fn skipped_bytes(&self) -> u64 {
        self.decoder.skipped_bytes()
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Drops any partial frame: the peer that was sending it is gone, and
    /// its remainder must not swallow the next peer's first frames.
    pub fn reset(&mut self) {
        self.decoder = FrameDecoder::default();
    }

    /// Reads until one whole frame is decoded. A clean end of stream between
    /// frames is [`FrameError::Closed`]; inside a frame it is an I/O error.
    pub fn read_frame(&mut self) -> Result<Frame, FrameError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            let n = loop {
                match self.inner.read(&mut self.chunk) {
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                return Err(if self.decoder.is_idle() {
                    FrameError::Closed
                } else {
                    FrameError::Io(io::ErrorKind::UnexpectedEof.into())
                });
            }
            self.decoder.push(&self.chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: FrameKind, stream: u32, payload: &[u8]) -> Frame {
        Frame {
            kind,
            stream,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn round_trip_and_resync_after_garbage() {
        let mut bytes = b"garbage HG".to_vec();
        bytes.extend(frame(FrameKind::Stdout, 7, b"hello").encode());
        bytes.extend(frame(FrameKind::Guest, 0, b"{}").encode());
        let mut reader = FrameReader::new(&bytes[..]);
        assert_eq!(
            reader.read_frame().unwrap(),
            frame(FrameKind::Stdout, 7, b"hello")
        );
        assert_eq!(reader.skipped_bytes(), 10);
        assert_eq!(
            reader.read_frame().unwrap(),
            frame(FrameKind::Guest, 0, b"{}")
        );
        assert!(matches!(reader.read_frame(), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.push(3);
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(u32::MAX.to_le_bytes());
        let err = FrameReader::new(&bytes[..]).read_frame().unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: u32::MAX }));
    }

    #[test]
    fn truncated_frame_is_an_io_error_not_a_hang() {
        let bytes = frame(FrameKind::Stdout, 1, b"abcdef").encode();
        let err = FrameReader::new(&bytes[..bytes.len() - 2])
            .read_frame()
            .unwrap_err();
        assert!(matches!(err, FrameError::Io(_)));
    }

    #[test]
    fn unknown_kind_is_reported_and_reader_recovers() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend([99, 0, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend(frame(FrameKind::Stderr, 2, b"x").encode());
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(matches!(
            reader.read_frame(),
            Err(FrameError::UnknownKind { kind: 99 })
        ));
        assert_eq!(
            reader.read_frame().unwrap(),
            frame(FrameKind::Stderr, 2, b"x")
        );
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode_whole() {
        let bytes = frame(FrameKind::Stdout, 9, b"split me").encode();
        for cut in 0..bytes.len() {
            let mut decoder = FrameDecoder::default();
            decoder.push(&bytes[..cut]);
            assert!(decoder.next_frame().unwrap().is_none(), "cut {cut}");
            decoder.push(&bytes[cut..]);
            assert_eq!(
                decoder.next_frame().unwrap().unwrap(),
                frame(FrameKind::Stdout, 9, b"split me")
            );
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the reader and never yield a frame
        /// larger than the limit.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut reader = FrameReader::new(&bytes[..]);
            for _ in 0..64 {
                match reader.read_frame() {
                    Ok(frame) => prop_assert!(frame.payload.len() <= MAX_PAYLOAD as usize),
                    Err(FrameError::Closed | FrameError::Io(_)) => break,
                    Err(_) => {}
                }
            }
        }

        #[test]
        fn any_frame_round_trips(kind in 1u8..=5, stream: u32, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let original = Frame { kind: FrameKind::from_byte(kind).unwrap(), stream, payload };
            let bytes = original.encode();
            prop_assert_eq!(FrameReader::new(&bytes[..]).read_frame().unwrap(), original);
        }
    }
}
