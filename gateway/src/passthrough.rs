//! The pass-through: how a header reroute carries the requests that are not
//! for a laptop (a teammate's everyday traffic) at close to the cost of a
//! raw splice.
//!
//! [`serve`] takes a downstream connection of a port with header rules. As
//! long as its requests are plain HTTP/1.1 that match no rule, each goes to
//! the pods (the rules' fallback) **byte for byte**, on one upstream
//! connection paired with the caller's and reused for its next requests,
//! and the answer comes back byte for byte. Only the request and response
//! heads are parsed (httparse), to route, and to know where each message
//! ends so the next request can be routed again: nothing is copied into
//! header maps, re-encoded or handed between tasks (the full proxy,
//! [`httproute::serve`], costs about 2.5× the CPU per request; BENCHMARKS.md).
//!
//! Anything else hands the connection, with the bytes read so far put
//! back, to [`httproute::serve`] for the rest of its life, which gives it
//! the full proxy's behaviour: a request that matches a rule (to a laptop,
//! with fail-open), HTTP/2, HTTP/1.0, `Upgrade`, `CONNECT`, `Expect`, a
//! `Transfer-Encoding` (chunked upload) or an ambiguous `Content-Length`,
//! `Connection` options other than `close`/`keep-alive`, a body over
//! [`MAX_BODY`], a head it cannot parse or over [`MAX_HEAD`]. Those are rare, and what needs hyper's
//! strictness (and its `400`s) gets it: what the pass-through forwards as
//! is has exactly one reading of where it ends, so it cannot smuggle a
//! request past the routing.
//!
//! Failures: the pods cannot be dialled → the caller gets the full proxy's
//! `502` (naming the shadow) and the connection closes. An upstream
//! connection kept from an earlier request that the pods closed meanwhile
//! is replaced before use; one that fails under a request is replaced once
//! if the request may be sent again (idempotent, whole in hand), else
//! `502`. A response whose end cannot be told (a malformed head or chunk)
//! is passed on as is until the pods close, then the caller's connection
//! closes too.
//!
//! Why no further (figures in BENCHMARKS.md, "the tax on teammates"): per
//! request the pass-through's user space costs a few µs; what remains is
//! the kernel's work for the two extra TCP legs (caller → gateway, gateway
//! → pod), which about doubles the machine's CPU per request. On a machine
//! the load saturates any proxy on the path — hyper, a raw splice, more
//! threads — stays near half the direct requests/s, so the 0.7× goal is
//! out of reach for an in-path proxy. Meeting it takes the gateway off the
//! path of requests that match no rule: delegating the header match to a
//! mesh the cluster already runs (an Istio VirtualService, a Gateway API
//! HTTPRoute on a Service parent). Not built: the miniature cluster has no
//! mesh.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::httproute::{self, BoxIo, Dial, Error, Replay, Rules, Upstream};

/// Longest request or response head read before giving up on it.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest request body the pass-through carries; a longer upload goes to
/// the full proxy, which streams both ways at once (the pass-through
/// sends the whole request before it reads the answer, so a server that
/// answers while it still reads a long upload could otherwise stall).
pub const MAX_BODY: u64 = 64 * 1024;
/// Most header lines in a head the pass-through parses.
const MAX_HEADERS: usize = 100;
/// Read buffer size, each direction.
const BUF: usize = 16 * 1024;

/// Serves one downstream connection of a port with header rules until it
/// closes (see the module documentation).
pub async fn serve(
    mut down: TcpStream,
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
) -> Result<(), Error> {
    let mut buf = BytesMut::with_capacity(BUF);
    let mut resp = BytesMut::with_capacity(BUF);
    let mut kept: Option<(Upstream, BoxIo)> = None;
    loop {
        // A whole request head, and what to do with it. Parsed on the
        // first bytes (what is not HTTP is told at once), then only once
        // the head's blank line may have come: a caller dripping a head
        // byte by byte costs a few parses, not one per byte.
        let mut scanned: usize = 0;
        let head = loop {
            let from = scanned.saturating_sub(3);
            scanned = buf.len();
            if !buf.is_empty() && (from == 0 || ends_a_head(&buf[from..])) {
                let parsed = {
                    let rules = rules.borrow();
                    parse_request(&buf, &rules)
                };
                match parsed {
                    Parsed::Pass(head) => break head,
                    Parsed::Partial if buf.len() < MAX_HEAD => {}
                    Parsed::Partial | Parsed::Hand => {
                        return hand_over(down, buf, rules, dial).await;
                    }
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(BUF);
            }
            match down.read_buf(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(Error::Downstream(Box::new(e))),
            }
        };
        let to = rules.borrow().fallback.clone();
        tracing::debug!(upstream = %to, reused = kept.is_some(), "no header match: to the pods");
        let kept_up = match kept.take() {
            Some((at, mut up)) if at == to => still_open(&mut up).then_some(up),
            _ => None,
        };
        let (mut up, reused) = match kept_up {
            Some(up) => (up, true),
            None => match httproute::dial_upstream(&*dial, &to).await {
                Ok(up) => (up, false),
                Err(e) => {
                    httproute::warn_nothing_answered(&to, &e);
                    return bad_gateway(down, buf, &to).await;
                }
            },
        };
        // The head and the part of the body already read, in one write.
        let in_hand = usize::try_from(head.body)
            .unwrap_or(usize::MAX)
            .min(buf.len() - head.len);
        let first = buf.split_to(head.len + in_hand);
        let whole = in_hand as u64 == head.body;
        let mut sent = up.write_all(&first).await;
        if sent.is_err() && reused && whole && head.resendable {
            match httproute::dial_upstream(&*dial, &to).await {
                Ok(fresh) => {
                    up = fresh;
                    sent = up.write_all(&first).await;
                }
                Err(e) => sent = Err(e),
            }
        }
        if let Err(e) = sent {
            httproute::warn_nothing_answered(&to, &e);
            return bad_gateway(down, unsplit(first, buf), &to).await;
        }
        // The rest of the body, as it comes.
        let mut left = head.body - in_hand as u64;
        while left > 0 {
            if down
                .read_buf(&mut buf)
                .await
                .map_err(|e| Error::Downstream(Box::new(e)))?
                == 0
            {
                // The caller gave up mid-body: nothing to answer.
                return Ok(());
            }
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let chunk = buf.split_to(n);
            if let Err(e) = up.write_all(&chunk).await {
                // The pods may have answered early (413) and closed.
                tracing::debug!(upstream = %to, "request body not taken: {e}");
                break;
            }
            left -= n as u64;
        }
        // The answer.
        match relay_response(&mut up, &mut down, &mut resp, &head).await {
            Ok(Ended::KeepAlive) if !head.close => kept = Some((to, up)),
            Ok(Ended::KeepAlive | Ended::Close) => {
                let _ = down.shutdown().await;
                return Ok(());
            }
            Err(Relay::NothingFrom(e)) if reused && whole && head.resendable => {
                // The pods closed a kept connection under the request:
                // once more on a fresh one.
                tracing::debug!(upstream = %to, "kept connection failed ({e}); sending again");
                buf = unsplit(first, buf);
                continue;
            }
            Err(Relay::NothingFrom(e)) => {
                httproute::warn_nothing_answered(&to, &e);
                return bad_gateway(down, unsplit(first, buf), &to).await;
            }
            Err(Relay::Downstream(e)) => return Err(Error::Downstream(Box::new(e))),
            Err(Relay::Upstream(e)) => {
                return Err(Error::Splice {
                    upstream: to,
                    source: e,
                });
            }
        }
    }
}

/// Whether `bytes` hold the blank line that ends a head (`\n\n`, or
/// `\n\r\n`).
fn ends_a_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// `first` (a request already taken out of `rest`) put back in front.
fn unsplit(mut first: BytesMut, rest: BytesMut) -> BytesMut {
    first.extend_from_slice(&rest);
    first
}

/// The rest of the connection goes to the full proxy, `buf` replayed.
async fn hand_over(
    down: TcpStream,
    buf: BytesMut,
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
) -> Result<(), Error> {
    let replay = Replay::new(buf.freeze(), Box::new(down));
    httproute::serve(Box::new(replay), rules, dial).await
}

/// The full proxy's `502` naming `to` for the request in `buf`, then close.
async fn bad_gateway(down: TcpStream, buf: BytesMut, to: &Upstream) -> Result<(), Error> {
    let replay = Replay::new(buf.freeze(), Box::new(down));
    httproute::serve_bad_gateway(Box::new(replay), to).await
}

/// Whether a kept upstream connection is still usable: not closed by the
/// pods, nothing unasked-for waiting on it. Polled once, never waits.
fn still_open(up: &mut BoxIo) -> bool {
    let mut probe = [0u8; 1];
    match futures::FutureExt::now_or_never(up.read(&mut probe)) {
        None => true,
        Some(Ok(_) | Err(_)) => false,
    }
}

/// A request head the pass-through forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestHead {
    /// Bytes of the head, the blank line included.
    len: usize,
    /// Bytes of the body (`Content-Length`, or 0).
    body: u64,
    /// `HEAD`: the response has no body whatever its head says.
    head_method: bool,
    /// `Connection: close`: the last request of the connection.
    close: bool,
    /// May be sent again on a fresh connection (idempotent method).
    resendable: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Pass(RequestHead),
    /// Not a whole head yet.
    Partial,
    /// For the full proxy.
    Hand,
}

/// Reads the request head at the start of `buf`.
fn parse_request(buf: &[u8], rules: &Rules) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hand,
    };
    if req.version != Some(1) {
        return Parsed::Hand;
    }
    let method = req.method.unwrap_or("");
    if method == "CONNECT" {
        return Parsed::Hand;
    }
    let mut body: Option<u64> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if rules
            .rules
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r.header.as_str()) && h.value == r.value.as_bytes())
        {
            return Parsed::Hand;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (body, content_length(h.value)) {
                (None, Some(n)) => body = Some(n),
                _ => return Parsed::Hand,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Parsed::Hand;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    return Parsed::Hand;
                }
            }
        }
    }
    let body = body.unwrap_or(0);
    if body > MAX_BODY {
        return Parsed::Hand;
    }
    Parsed::Pass(RequestHead {
        len,
        body,
        head_method: method == "HEAD",
        close,
        resendable: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
    })
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6), at most 18 of
/// them.
fn content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// How a response ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Where its framing said: the connections may carry the next request.
    KeepAlive,
    /// The pods close (or said they would): so does the caller's.
    Close,
}

enum Relay {
    /// The pods sent nothing at all before closing or failing.
    NothingFrom(io::Error),
    Upstream(io::Error),
    Downstream(io::Error),
}

/// Where a response body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunked),
    /// When the pods close.
    Close,
}

/// What a response head says.
#[derive(Debug, PartialEq, Eq)]
enum ResponseHead {
    /// 1xx other than 101: another head follows.
    Interim {
        len: usize,
    },
    Final {
        len: usize,
        framing: Framing,
        close: bool,
    },
    /// Malformed, `101`, or too long: the rest is passed on as is.
    Opaque,
    Partial,
}

fn parse_response(buf: &[u8], request: &RequestHead) -> ResponseHead {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return ResponseHead::Partial,
        _ => return ResponseHead::Opaque,
    };
    let code = resp.code.unwrap_or(0);
    if code == 101 {
        return ResponseHead::Opaque;
    }
    if (100..200).contains(&code) {
        return ResponseHead::Interim { len };
    }
    let http10 = resp.version == Some(0);
    let mut close = http10;
    let mut length: Option<Option<u64>> = None;
    let mut chunked: Option<bool> = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value);
            length = match length {
                None => Some(n),
                Some(m) if m == n => Some(n),
                Some(_) => Some(None),
            };
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides (RFC 9112 §6.3).
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let framing = if request.head_method || code == 204 || code == 304 {
        Framing::Length(0)
    } else {
        match (chunked, length) {
            (Some(true), _) if !http10 => Framing::Chunked(Chunked::default()),
            (Some(_), _) => Framing::Close,
            (None, Some(Some(n))) => Framing::Length(n),
            (None, Some(None)) => Framing::Close,
            (None, None) => Framing::Close,
        }
    };
    if framing == Framing::Close || chunked.is_some() && length.is_some() {
        close = true;
    }
    ResponseHead::Final {
        len,
        framing,
        close,
    }
}

/// Passes one response (interim ones included) from `up` to `down`.
async fn relay_response(
    up: &mut BoxIo,
    down: &mut TcpStream,
    buf: &mut BytesMut,
    request: &RequestHead,
) -> Result<Ended, Relay> {
    buf.clear();
    let mut forwarded = false;
    loop {
        let head = parse_response(buf, request);
        let (len, mut framing, close) = match head {
            ResponseHead::Partial => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(BUF);
                }
                match up.read_buf(buf).await {
                    Ok(0) if !forwarded && buf.is_empty() => {
                        return Err(Relay::NothingFrom(io::ErrorKind::UnexpectedEof.into()));
                    }
                    Ok(0) => return opaque(up, down, buf).await,
                    Ok(_) => continue,
                    Err(e) if !forwarded && buf.is_empty() => return Err(Relay::NothingFrom(e)),
                    Err(e) => return Err(Relay::Upstream(e)),
                }
            }
            ResponseHead::Opaque => return opaque(up, down, buf).await,
            ResponseHead::Interim { len } => {
                let interim = buf.split_to(len);
                down.write_all(&interim).await.map_err(Relay::Downstream)?;
                forwarded = true;
                continue;
            }
            ResponseHead::Final {
                len,
                framing,
                close,
            } => (len, framing, close),
        };
        // Head and body as they come, each read written on at once.
        let mut at = len;
        loop {
            let (done, end) = match &mut framing {
                Framing::Length(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len() - at);
                    *left -= n as u64;
                    (*left == 0, at + n)
                }
                Framing::Chunked(state) => match state.feed(&buf[at..]) {
                    Ok(Some(n)) => (true, at + n),
                    Ok(None) => (false, buf.len()),
                    Err(()) => {
                        // Unknown end from here on: as is, until they close.
                        return opaque(up, down, buf).await;
                    }
                },
                Framing::Close => (false, buf.len()),
            };
            if end > 0 {
                down.write_all(&buf[..end])
                    .await
                    .map_err(Relay::Downstream)?;
            }
            let extra = buf.len() > end;
            buf.clear();
            if done {
                // Bytes past the end were never asked for: do not reuse.
                return Ok(if close || extra {
                    Ended::Close
                } else {
                    Ended::KeepAlive
                });
            }
            at = 0;
            match up.read_buf(buf).await {
                Ok(0) if framing == Framing::Close => return Ok(Ended::Close),
                Ok(0) => {
                    return Err(Relay::Upstream(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the pods closed mid-response",
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(Relay::Upstream(e)),
            }
        }
    }
}

/// Passes `buf` and then everything from `up` on to `down` until `up`
/// closes.
async fn opaque(up: &mut BoxIo, down: &mut TcpStream, buf: &mut BytesMut) -> Result<Ended, Relay> {
    down.write_all(buf).await.map_err(Relay::Downstream)?;
    buf.clear();
    tokio::io::copy(up, down).await.map_err(Relay::Upstream)?;
    Ok(Ended::Close)
}

/// Where a chunked body ends (RFC 9112 §7.1), told from its bytes as they
/// pass: chunk sizes, extensions and trailers are skipped, not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum ChunkState {
    /// In a chunk-size line: its hex digits so far.
    #[default]
    SizeStart,
    Size {
        size: u64,
    },
    /// Past the size: extensions up to the line's end.
    SizeRest {
        size: u64,
    },
    Data {
        left: u64,
    },
    /// The CRLF after a chunk's data.
    DataEnd {
        cr: bool,
    },
    /// After the last chunk: trailer lines, then an empty line.
    LineStart,
    /// Inside a trailer line.
    Line,
    /// A CR at the start of a line: the empty line's end comes next.
    LastCr,
}

impl Chunked {
    /// Takes the next bytes of the body: `Some(n)` when the body ends after
    /// `n` of them, `None` when it goes on past them, `Err` when they are
    /// not a chunked body.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match std::mem::take(&mut self.state) {
                SizeStart => Size {
                    size: u64::from(hex(b).ok_or(())?),
                },
                Size { size } => match hex(b) {
                    Some(d) => {
                        if size >> 56 != 0 {
                            return Err(());
                        }
                        Size {
                            size: size << 4 | u64::from(d),
                        }
                    }
                    None if b == b'\n' => Self::after_size(size),
                    None if matches!(b, b';' | b' ' | b'\t' | b'\r') => SizeRest { size },
                    None => return Err(()),
                },
                SizeRest { size } => match b {
                    b'\n' => Self::after_size(size),
                    _ => SizeRest { size },
                },
                Data { left } => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        DataEnd { cr: false }
                    } else {
                        Data { left }
                    };
                    continue;
                }
                DataEnd { cr } => match b {
                    b'\r' if !cr => DataEnd { cr: true },
                    b'\n' => SizeStart,
                    _ => return Err(()),
                },
                LineStart => match b {
                    b'\r' => LastCr,
                    b'\n' => return Ok(Some(i + 1)),
                    _ => Line,
                },
                Line => match b {
                    b'\n' => LineStart,
                    _ => Line,
                },
                LastCr => match b {
                    b'\n' => return Ok(Some(i + 1)),
                    _ => return Err(()),
                },
            };
            i += 1;
        }
        Ok(None)
    }

    fn after_size(size: u64) -> ChunkState {
        if size == 0 {
            ChunkState::LineStart
        } else {
            ChunkState::Data { left: size }
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::httproute::Rule;
    use burrow_api::Fallback;
    use http::{HeaderName, HeaderValue};
    use std::net::SocketAddr;

    fn rules() -> Rules {
        Rules {
            rules: vec![Rule {
                header: HeaderName::from_static("x-burrow-route"),
                value: HeaderValue::from_static("alice"),
                to: Upstream::Laptop {
                    name: "alice".into(),
                    addr: SocketAddr::from(([198, 19, 0, 2], 3000)),
                },
                fallback: Fallback::Error,
            }],
            fallback: Upstream::Cluster(SocketAddr::from(([10, 96, 0, 9], 8080))),
        }
    }

    fn pass(req: &str) -> RequestHead {
        match parse_request(req.as_bytes(), &rules()) {
            Parsed::Pass(h) => h,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    #[test]
    fn plain_requests_pass_with_their_framing() {
        let h = pass("GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b");
        assert_eq!(h.len, 28);
        assert_eq!(
            (h.body, h.close, h.head_method, h.resendable),
            (0, false, false, true)
        );
        let h = pass(
            "POST / HTTP/1.1\r\ncontent-length:  12 \r\nConnection: keep-alive, Close\r\n\r\n",
        );
        assert_eq!((h.body, h.close, h.resendable), (12, true, false));
        assert!(pass("HEAD / HTTP/1.1\r\n\r\n").head_method);
        // Another value of the routing header, or another header: pods.
        pass("GET / HTTP/1.1\r\nx-burrow-route: bob\r\nx-other: alice\r\n\r\n");
    }

    #[test]
    fn what_the_pass_through_does_not_carry_goes_to_the_full_proxy() {
        for req in [
            // Matches a rule, whatever the name's case.
            "GET / HTTP/1.1\r\nX-Burrow-Route: alice\r\n\r\n",
            "GET / HTTP/1.1\r\nx-burrow-route: bob\r\nx-burrow-route: alice\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            // Request smuggling shapes: one reading only, or hyper's.
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: x-private\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n",
            "\u{1}\u{2}\r\n\r\n",
        ] {
            assert_eq!(
                parse_request(req.as_bytes(), &rules()),
                Parsed::Hand,
                "{req:?}"
            );
        }
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n", &rules()),
            Parsed::Partial
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_request(req.as_bytes(), &rules()), Parsed::Hand);
    }

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert!(ends_a_head(b"x: y\r\n\r\n"));
        assert!(ends_a_head(b"\n\n"));
        assert!(ends_a_head(b"\n\r\n"));
        assert!(!ends_a_head(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(!ends_a_head(b"\r\n\r"));
    }

    fn get() -> RequestHead {
        pass("GET / HTTP/1.1\r\n\r\n")
    }

    fn final_of(resp: &str, req: &RequestHead) -> (usize, Framing, bool) {
        match parse_response(resp.as_bytes(), req) {
            ResponseHead::Final {
                len,
                framing,
                close,
            } => (len, framing, close),
            other => panic!("{resp:?}: {other:?}"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let r = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(final_of(r, &get()), (38, Framing::Length(5), false));
        let head = pass("HEAD / HTTP/1.1\r\n\r\n");
        assert_eq!(final_of(r, &head).1, Framing::Length(0));
        for code in ["204 No Content", "304 Not Modified"] {
            let r = format!("HTTP/1.1 {code}\r\nContent-Length: 9\r\n\r\n");
            assert_eq!(final_of(&r, &get()).1, Framing::Length(0), "{code}");
        }
        let r = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(final_of(r, &get()).1, Framing::Chunked(Chunked::default()));
        // Both: chunked wins, and the connection is not reused.
        let r = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (_, framing, close) = final_of(r, &get());
        assert_eq!(
            (framing, close),
            (Framing::Chunked(Chunked::default()), true)
        );
        // No length, a coding that is not chunked, conflicting lengths:
        // until the pods close.
        for r in [
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        ] {
            assert_eq!(final_of(r, &get()).1, Framing::Close, "{r:?}");
            assert!(final_of(r, &get()).2, "{r:?}");
        }
        let r = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(final_of(r, &get()).1, Framing::Length(5));
        assert!(
            final_of(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                &get()
            )
            .2
        );
        assert!(final_of("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &get()).2);
        assert!(
            !final_of(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                &get()
            )
            .2
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", &get()),
            ResponseHead::Interim { len: 25 }
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &get()),
            ResponseHead::Opaque
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n", &get()),
            ResponseHead::Partial
        );
        assert_eq!(
            parse_response(b"SSH-2.0-x\r\n\r\n", &get()),
            ResponseHead::Opaque
        );
    }

    /// Feeds `body` in pieces of `step` bytes; where it ended.
    fn chunked_end(body: &[u8], step: usize) -> Result<Option<usize>, ()> {
        let mut c = Chunked::default();
        let mut at = 0;
        for piece in body.chunks(step) {
            if let Some(n) = c.feed(piece)? {
                return Ok(Some(at + n));
            }
            at += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_where_it_says_however_it_is_split() {
        let body =
            b"5;name=\"v\"\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\nx-t2: 2\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in 1..=body.len() {
            assert_eq!(chunked_end(body, step), Ok(Some(end)), "step {step}");
        }
        assert_eq!(chunked_end(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(chunked_end(b"000\n\n", 2), Ok(Some(5)));
        assert_eq!(chunked_end(b"5\r\nhel", 3), Ok(None));
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"0\r\n\rX",
            b"ffffffffffffffffff\r\n",
        ] {
            assert_eq!(chunked_end(bad, 1), Err(()), "{bad:?}");
        }
    }
}
