//! WireGuard datagrams length-framed over a byte stream.
//!
//! The Kubernetes port-forward transport is a byte stream, but WireGuard
//! speaks datagrams. Each datagram travels as a 2-byte big-endian length
//! followed by that many bytes. Lengths of zero are rejected (WireGuard never
//! sends an empty datagram, so a zero is a sign the stream is out of step),
//! and a decoder can be given a smaller maximum than 65535 to bound what a
//! peer can make it buffer.
//!
//! The decoder accepts the stream in arbitrary chunks and, when a whole frame
//! sits inside one chunk (the common case), hands it back without copying.
//! After an error the stream position is lost, so the decoder stays failed and
//! the caller must drop the stream.

/// Largest payload a 2-byte length can describe.
pub const MAX_FRAME: usize = u16::MAX as usize;
/// Bytes of framing in front of each datagram.
pub const HEADER_LEN: usize = 2;
/// The tunnel MTU of a laptop on the framed transport. A byte stream has
/// no path MTU to fit: 16 KiB packets carry a bulk transfer in a twelfth of
/// the packets (and of the per-packet work in smoltcp, boringtun, the
/// framing and the TUN) that 1,420-byte ones take. The gateway's stack
/// takes and sends TCP segments this large; each flow's segments are
/// bounded by the MSS the laptop's kernel announces (its TUN MTU), so
/// laptops on the UDP transport still get 1,420-byte packets.
pub const FRAMED_MTU: u16 = 16384;

/// Why a frame cannot be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("zero-length frame: the stream is out of step")]
    Empty,
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("output buffer holds {got} bytes, frame needs {needed}")]
    BufferTooSmall { needed: usize, got: usize },
}

/// The 2-byte header for a datagram of `len` bytes, for callers that write
/// header and payload with one vectored write instead of copying.
pub fn frame_header(len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let len = u16::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: MAX_FRAME,
    })?;
    Ok(len.to_be_bytes())
}

/// Write `payload` as one frame at the start of `out`; returns the number of
/// bytes written.
pub fn encode_frame(payload: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let header = frame_header(payload.len())?;
    let needed = HEADER_LEN + payload.len();
    let got = out.len();
    let out = out
        .get_mut(..needed)
        .ok_or(FrameError::BufferTooSmall { needed, got })?;
    out[..HEADER_LEN].copy_from_slice(&header);
    out[HEADER_LEN..].copy_from_slice(payload);
    Ok(needed)
}

/// Incremental decoder of framed datagrams.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Length of the frame whose body is being collected; 0 while reading a
    /// header.
    want: usize,
    /// Body of a frame that arrived split across chunks; its capacity is kept
    /// so steady-state decoding does not allocate.
    body: Vec<u8>,
    failed: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder accepting frames up to [`MAX_FRAME`] bytes.
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME)
    }

    /// A decoder rejecting frames larger than `max` (clamped to
    /// [`MAX_FRAME`]).
    pub fn with_max_frame(max: usize) -> Self {
        Self {
            max: max.min(MAX_FRAME),
            header: [0; HEADER_LEN],
            header_len: 0,
            want: 0,
            body: Vec::new(),
            failed: None,
        }
    }

    /// True when the decoder sits between frames, so an end of stream here is
    /// clean rather than a truncated frame.
    pub fn is_at_boundary(&self) -> bool {
        self.header_len == 0 && self.want == 0 && self.failed.is_none()
    }

    /// Consume bytes from the front of `input` until one frame is complete
    /// and return it, or return `Ok(None)` once `input` is exhausted. Call in
    /// a loop until it returns `Ok(None)`.
    pub fn decode<'s, 'i: 's>(
        &'s mut self,
        input: &mut &'i [u8],
    ) -> Result<Option<&'s [u8]>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.want == 0 {
            if self.header_len == 0 && input.len() >= HEADER_LEN {
                let len = self.check_len(u16::from_be_bytes([input[0], input[1]]))?;
                if let Some(frame) = input.get(HEADER_LEN..HEADER_LEN + len) {
                    // Whole frame in this chunk: no copy.
                    *input = &input[HEADER_LEN + len..];
                    return Ok(Some(frame));
                }
                *input = &input[HEADER_LEN..];
                self.start_body(len);
            } else {
                while self.header_len < HEADER_LEN {
                    let Some((&b, rest)) = input.split_first() else {
                        return Ok(None);
                    };
                    self.header[self.header_len] = b;
                    self.header_len += 1;
                    *input = rest;
                }
                self.header_len = 0;
                let len = self.check_len(u16::from_be_bytes(self.header))?;
                self.start_body(len);
            }
        }
        let take = (self.want - self.body.len()).min(input.len());
        self.body.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.body.len() == self.want {
            self.want = 0;
            return Ok(Some(&self.body));
        }
        Ok(None)
    }

    fn check_len(&mut self, len: u16) -> Result<usize, FrameError> {
        let len = usize::from(len);
        let err = if len == 0 {
            FrameError::Empty
        } else if len > self.max {
            FrameError::TooLarge { len, max: self.max }
        } else {
            return Ok(len);
        };
        self.failed = Some(err);
        Err(err)
    }

    fn start_body(&mut self, len: usize) {
        self.want = len;
        self.body.clear();
        self.body.reserve(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Vec<u8>> {
        vec![
            vec![1],
            (0..=255u8).collect(),
            vec![7; 148],
            vec![9; 2],
            (0..1500).map(|i| (i % 251) as u8).collect(),
        ]
    }

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            let mut buf = vec![0; f.len() + HEADER_LEN];
            let n = encode_frame(f, &mut buf).expect("encodes");
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    fn decode_chunks(dec: &mut FrameDecoder, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for chunk in chunks {
            let mut input = *chunk;
            while let Some(f) = dec.decode(&mut input).expect("valid stream") {
                got.push(f.to_vec());
            }
            assert!(input.is_empty());
        }
        got
    }

    #[test]
    fn every_single_split_point() {
        let fs = frames();
        let s = stream(&fs);
        for at in 0..=s.len() {
            let mut dec = FrameDecoder::new();
            let got = decode_chunks(&mut dec, &[&s[..at], &s[at..]]);
            assert_eq!(got, fs, "split at {at}");
            assert!(dec.is_at_boundary());
        }
    }

    #[test]
    fn every_pair_of_split_points_in_a_short_stream() {
        let fs = vec![vec![1, 2, 3], vec![4], vec![5, 6]];
        let s = stream(&fs);
        for a in 0..=s.len() {
            for b in a..=s.len() {
                let mut dec = FrameDecoder::new();
                let got = decode_chunks(&mut dec, &[&s[..a], &s[a..b], &s[b..]]);
                assert_eq!(got, fs, "splits at {a},{b}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let fs = frames();
        let s = stream(&fs);
        let chunks: Vec<&[u8]> = s.chunks(1).collect();
        let mut dec = FrameDecoder::new();
        assert_eq!(decode_chunks(&mut dec, &chunks), fs);
    }

    #[test]
    fn mid_frame_is_not_a_boundary() {
        let s = stream(&[vec![1, 2, 3]]);
        let mut dec = FrameDecoder::new();
        let mut input = &s[..3];
        assert_eq!(dec.decode(&mut input), Ok(None));
        assert!(!dec.is_at_boundary());
    }

    #[test]
    fn rejects_zero_length_and_stays_failed() {
        let mut dec = FrameDecoder::new();
        let mut input: &[u8] = &[0, 0, 1, 2];
        assert_eq!(dec.decode(&mut input), Err(FrameError::Empty));
        let mut more: &[u8] = &[0, 1, 5];
        assert_eq!(dec.decode(&mut more), Err(FrameError::Empty));
        // Split header too.
        let mut dec = FrameDecoder::new();
        let mut a: &[u8] = &[0];
        assert_eq!(dec.decode(&mut a), Ok(None));
        let mut b: &[u8] = &[0];
        assert_eq!(dec.decode(&mut b), Err(FrameError::Empty));
    }

    #[test]
    fn rejects_oversized() {
        let mut dec = FrameDecoder::with_max_frame(100);
        let mut input: &[u8] = &[0, 101];
        assert_eq!(
            dec.decode(&mut input),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
        let mut buf = vec![0; MAX_FRAME + 3];
        assert_eq!(
            encode_frame(&vec![0; MAX_FRAME + 1], &mut buf),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
        // The largest frame round-trips.
        let big = vec![0xab; MAX_FRAME];
        let n = encode_frame(&big, &mut buf).expect("fits");
        let mut dec = FrameDecoder::new();
        let mut input = &buf[..n];
        assert_eq!(dec.decode(&mut input), Ok(Some(&big[..])));
    }

    #[test]
    fn encoder_errors() {
        assert_eq!(encode_frame(&[], &mut [0; 4]), Err(FrameError::Empty));
        assert_eq!(
            encode_frame(&[1, 2, 3], &mut [0; 4]),
            Err(FrameError::BufferTooSmall { needed: 5, got: 4 })
        );
        assert_eq!(frame_header(258), Ok([1, 2]));
    }
}
