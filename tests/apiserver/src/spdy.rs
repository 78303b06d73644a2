//! SPDY/3.1 framing, as the kubelet's streaming server (moby/spdystream)
//! speaks it for `pods/portforward`: control frames (SYN_STREAM, SYN_REPLY,
//! RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and DATA
//! frames, with header blocks zlib-compressed against the SPDY/3
//! dictionary, one compression context per direction for the whole
//! connection (each block ends with a sync flush).
//!
//! Sans-IO: [`FrameDecoder`] and [`FrameEncoder`] are `tokio_util` codecs;
//! the session that uses them lives in `portforward`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// FLAG_FIN on DATA, SYN_STREAM, SYN_REPLY and HEADERS frames.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// RST_STREAM status codes used here.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_INVALID_STREAM: u32 = 2;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_CANCEL: u32 = 5;

/// Largest frame payload accepted (the field is 24 bits).
pub const MAX_FRAME_LEN: usize = (1 << 24) - 1;
/// Largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 1 << 20;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// A header block: lower-case names in wire order; a value holding several
/// values keeps them NUL-separated, as on the wire.
pub type Headers = Vec<(String, String)>;

/// The first value of header `name` (names are lower case on the wire).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// (flags, id, value) per entry.
    Settings {
        flags: u8,
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this side does not know (ignored, as the
    /// spec asks).
    Unknown {
        kind: u16,
        flags: u8,
    },
}

/// A malformed frame or header block.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY: {0}")]
    Protocol(String),
    #[error("SPDY header compression: {0}")]
    Zlib(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn proto(msg: impl Into<String>) -> SpdyError {
    SpdyError::Protocol(msg.into())
}

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1):
/// length-prefixed common header names and values, then a run of common
/// text. 1423 bytes, Adler-32 0xe3c6a7c2.
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
            "203 Non-Authoritative Information",
            "204 No Content",
            "301 Moved Permanently",
            "400 Bad Request",
            "401 Unauthorized",
            "403 Forbidden",
            "404 Not Found",
            "500 Internal Server Error",
            "501 Not Implemented",
            "503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec",
            " 00:00:00",
            " Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
            "application/xhtml+xml,text/plain,text/javascript,",
            "publicprivatemax-age=gzip,deflate,sdch",
            "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        );
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// Compresses header blocks for one direction of a connection.
pub struct HeaderCompressor {
    z: Compress,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCompressor {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::best(), true);
        // A fresh compressor always takes a dictionary.
        let _ = z.set_dictionary(dictionary());
        Self { z }
    }

    /// The compressed block for `headers` (sync-flushed, so the peer can
    /// inflate it on its own).
    pub fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let mut raw = Vec::new();
        raw.put_u32(headers.len() as u32);
        for (n, v) in headers {
            raw.put_u32(n.len() as u32);
            raw.extend_from_slice(n.to_ascii_lowercase().as_bytes());
            raw.put_u32(v.len() as u32);
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let start_in = self.z.total_in();
        loop {
            let done = (self.z.total_in() - start_in) as usize;
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            self.z
                .compress_vec(&raw[done..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Zlib(e.to_string()))?;
            // Finished once all input is taken and the flush left room.
            if (self.z.total_in() - start_in) as usize == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// Inflates header blocks for one direction of a connection.
pub struct HeaderDecompressor {
    z: Decompress,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// Parses one compressed header block.
    pub fn decompress(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let mut out: Vec<u8> = Vec::with_capacity(block.len() * 4 + 64);
        let start_in = self.z.total_in();
        loop {
            let done = (self.z.total_in() - start_in) as usize;
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(proto("header block too large"));
                }
                out.reserve(out.len());
            }
            match self
                .z
                .decompress_vec(&block[done..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => return Err(proto("header stream ended")),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Zlib(e.to_string()))?;
                    continue;
                }
                Err(e) => return Err(SpdyError::Zlib(e.to_string())),
            }
            let used = (self.z.total_in() - start_in) as usize;
            if used == block.len() && out.len() < out.capacity() {
                break;
            }
            if used == done && out.len() < out.capacity() {
                return Err(proto("truncated header block"));
            }
        }
        parse_header_block(&out)
    }
}

fn parse_header_block(mut b: &[u8]) -> Result<Headers, SpdyError> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], SpdyError> {
        if b.len() < n {
            return Err(proto("short header block"));
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    fn u32_of(b: &mut &[u8]) -> Result<usize, SpdyError> {
        let s = take(b, 4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
    }
    let n = u32_of(&mut b)?;
    let mut h = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = u32_of(&mut b)?;
        let name = String::from_utf8_lossy(take(&mut b, len)?).to_ascii_lowercase();
        let len = u32_of(&mut b)?;
        let value = String::from_utf8_lossy(take(&mut b, len)?).into_owned();
        if h.iter().any(|(n, _)| *n == name) {
            return Err(proto(format!("duplicate header {name:?}")));
        }
        h.push((name, value));
    }
    Ok(h)
}

/// Reads frames (one direction: holds that direction's inflater).
#[derive(Default)]
pub struct FrameDecoder {
    headers: HeaderDecompressor,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }
}

impl tokio_util::codec::Decoder for FrameDecoder {
    type Item = Frame;
    type Error = SpdyError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if src.len() < 8 {
            return Ok(None);
        }
        let w0 = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let flags = src[4];
        let len = u32::from_be_bytes([0, src[5], src[6], src[7]]) as usize;
        if src.len() < 8 + len {
            src.reserve(8 + len - src.len());
            return Ok(None);
        }
        src.advance(8);
        let mut p = src.split_to(len).freeze();
        if w0 & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: w0 & 0x7fff_ffff,
                flags,
                data: p,
            }));
        }
        let version = ((w0 >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(proto(format!("unsupported version {version}")));
        }
        let kind = (w0 & 0xffff) as u16;
        let need = |p: &Bytes, n: usize| {
            if p.len() < n {
                Err(proto(format!("control frame {kind} too short")))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            TYPE_SYN_STREAM => {
                need(&p, 10)?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let associated = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = self.headers.decompress(&p)?;
                Frame::SynStream {
                    stream_id,
                    associated,
                    priority,
                    flags,
                    headers,
                }
            }
            TYPE_SYN_REPLY => {
                need(&p, 4)?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let headers = self.headers.decompress(&p)?;
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers,
                }
            }
            TYPE_HEADERS => {
                need(&p, 4)?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let headers = self.headers.decompress(&p)?;
                Frame::Headers {
                    stream_id,
                    flags,
                    headers,
                }
            }
            TYPE_RST_STREAM => {
                need(&p, 8)?;
                Frame::RstStream {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_SETTINGS => {
                need(&p, 4)?;
                let n = p.get_u32() as usize;
                need(&p, n.saturating_mul(8))?;
                let entries = (0..n)
                    .map(|_| {
                        let id = p.get_u32();
                        ((id >> 24) as u8, id & 0xff_ffff, p.get_u32())
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                need(&p, 4)?;
                Frame::Ping { id: p.get_u32() }
            }
            TYPE_GOAWAY => {
                need(&p, 8)?;
                Frame::GoAway {
                    last_good: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                need(&p, 8)?;
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    delta: p.get_u32() & 0x7fff_ffff,
                }
            }
            _ => Frame::Unknown { kind, flags },
        };
        Ok(Some(frame))
    }
}

/// Writes frames (one direction: holds that direction's deflater).
#[derive(Default)]
pub struct FrameEncoder {
    headers: HeaderCompressor,
}

impl FrameEncoder {
    pub fn new() -> Self {
        Self::default()
    }
}

fn control_header(dst: &mut BytesMut, kind: u16, flags: u8, len: usize) -> Result<(), SpdyError> {
    if len > MAX_FRAME_LEN {
        return Err(proto("frame too large"));
    }
    dst.reserve(8 + len);
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(kind);
    dst.put_u32(((flags as u32) << 24) | len as u32);
    Ok(())
}

impl tokio_util::codec::Encoder<Frame> for FrameEncoder {
    type Error = SpdyError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_FRAME_LEN {
                    return Err(proto("data frame too large"));
                }
                dst.reserve(8 + data.len());
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(((flags as u32) << 24) | data.len() as u32);
                dst.extend_from_slice(&data);
            }
            Frame::SynStream {
                stream_id,
                associated,
                priority,
                flags,
                headers,
            } => {
                let block = self.headers.compress(&headers)?;
                control_header(dst, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(associated & 0x7fff_ffff);
                dst.put_u8((priority & 7) << 5);
                dst.put_u8(0);
                dst.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.headers.compress(&headers)?;
                control_header(dst, TYPE_SYN_REPLY, flags, 4 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.extend_from_slice(&block);
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.headers.compress(&headers)?;
                control_header(dst, TYPE_HEADERS, flags, 4 + block.len())?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control_header(dst, TYPE_RST_STREAM, 0, 8)?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(status);
            }
            Frame::Settings { flags, entries } => {
                control_header(dst, TYPE_SETTINGS, flags, 4 + 8 * entries.len())?;
                dst.put_u32(entries.len() as u32);
                for (f, id, v) in entries {
                    dst.put_u32(((f as u32) << 24) | (id & 0xff_ffff));
                    dst.put_u32(v);
                }
            }
            Frame::Ping { id } => {
                control_header(dst, TYPE_PING, 0, 4)?;
                dst.put_u32(id);
            }
            Frame::GoAway { last_good, status } => {
                control_header(dst, TYPE_GOAWAY, 0, 8)?;
                dst.put_u32(last_good & 0x7fff_ffff);
                dst.put_u32(status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_header(dst, TYPE_WINDOW_UPDATE, 0, 8)?;
                dst.put_u32(stream_id & 0x7fff_ffff);
                dst.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Unknown { .. } => return Err(proto("cannot encode an unknown frame")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::{Decoder, Encoder};

    fn adler32(d: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in d {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(adler32(d), 0xe3c6_a7c2);
        assert!(d.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(d.ends_with(b"iso-8859-1,utf-,*,enq=0."));
    }

    #[test]
    fn first_header_block_names_the_dictionary() {
        let mut c = HeaderCompressor::new();
        let block = c.compress(&h(&[("streamtype", "error")])).expect("ok");
        // zlib header with FDICT, then the dictionary's Adler-32: what
        // every SPDY/3 peer's first header block starts with.
        assert_eq!(block[0], 0x78, "deflate, 32 KiB window");
        assert_ne!(block[1] & 0x20, 0, "FDICT");
        assert_eq!(&block[2..6], &[0xe3, 0xc6, 0xa7, 0xc2]);
        assert!(block.ends_with(&[0x00, 0x00, 0xff, 0xff]), "sync flush");
    }

    #[test]
    fn header_blocks_share_one_context_per_direction() {
        let mut c = HeaderCompressor::new();
        let mut d = HeaderDecompressor::new();
        let blocks = [
            h(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")]),
            h(&[("streamtype", "data"), ("port", "80"), ("requestid", "0")]),
            h(&[]),
            h(&[("streamtype", "data"), ("port", "8080"), ("requestid", "1")]),
            h(&[("x-multi", "a\0b")]),
        ];
        let mut sizes = Vec::new();
        for b in &blocks {
            let z = c.compress(b).expect("ok");
            sizes.push(z.len());
            assert_eq!(&d.decompress(&z).expect("ok"), b);
        }
        // The second block reuses the first one's text.
        assert!(sizes[1] < sizes[0], "{sizes:?}");
        assert_eq!(header(&blocks[4], "x-multi"), Some("a"));
        // A fresh inflater cannot read a block from the middle of a stream.
        let z = c.compress(&blocks[0]).expect("ok");
        assert!(HeaderDecompressor::new().decompress(&z).is_err());
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: h(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 3,
                status: RST_CANCEL,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![(0, 7, 65536), (1, 4, 100)],
            },
            Frame::Ping { id: 1 },
            Frame::GoAway {
                last_good: 5,
                status: 0,
            },
            Frame::Headers {
                stream_id: 5,
                flags: FLAG_FIN,
                headers: h(&[("a", "b")]),
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 4096,
            },
        ];
        let mut enc = FrameEncoder::new();
        let mut dec = FrameDecoder::new();
        let mut wire = BytesMut::new();
        for f in frames.clone() {
            enc.encode(f, &mut wire).expect("ok");
        }
        // Fed a byte at a time, the decoder waits for whole frames.
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = dec.decode(&mut buf).expect("ok") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn wire_layout() {
        let mut enc = FrameEncoder::new();
        let mut w = BytesMut::new();
        enc.encode(
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"ab"),
            },
            &mut w,
        )
        .expect("ok");
        assert_eq!(&w[..], &[0, 0, 0, 3, 1, 0, 0, 2, b'a', b'b']);
        w.clear();
        enc.encode(Frame::Ping { id: 7 }, &mut w).expect("ok");
        assert_eq!(&w[..], &[0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 7]);
        w.clear();
        enc.encode(
            Frame::RstStream {
                stream_id: 1,
                status: RST_REFUSED_STREAM,
            },
            &mut w,
        )
        .expect("ok");
        assert_eq!(&w[..], &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 3]);
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut dec = FrameDecoder::new();
        // Version 2.
        let mut b = BytesMut::from(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert!(dec.decode(&mut b).is_err());
        // A PING too short for its id.
        let mut b = BytesMut::from(&[0x80, 3, 0, 6, 0, 0, 0, 2, 0, 0][..]);
        assert!(FrameDecoder::new().decode(&mut b).is_err());
        // Garbage where a header block belongs.
        let mut b = BytesMut::from(&[0x80, 3, 0, 2, 0, 0, 0, 8, 0, 0, 0, 1, 1, 2, 3, 4][..]);
        assert!(FrameDecoder::new().decode(&mut b).is_err());
        // An unknown control type is skipped, not fatal.
        let mut b = BytesMut::from(&[0x80, 3, 0, 0x0a, 0, 0, 0, 1, 9][..]);
        assert_eq!(
            FrameDecoder::new().decode(&mut b).expect("ok"),
            Some(Frame::Unknown { kind: 10, flags: 0 })
        );
    }
}
