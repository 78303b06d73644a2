//! Bytes into the DNS stub's synchronous entry (`burrow_dns::stub::Stub::
//! step`) from allowed and disallowed sources, over UDP and TCP, several
//! queries per input with time passing. Misses are resolved
//! (`Stub::resolve`) against an in-memory zone that answers at once
//! (records of every common type, CNAMEs, NXDOMAIN with an SOA, SERVFAIL,
//! failures, answers too big for UDP), so later queries take the cache and
//! the encoded-answer paths.
//!
//! Checked for every answer: it parses as DNS, carries the query's ID, is
//! a response, and fits the transport (UDP: at most 1232 bytes).
#![no_main]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use burrow_dns::route::ClusterView;
use burrow_dns::stub::{Config, Step, Stub, Transport};
use burrow_dns::upstream::{Exchange, ExchangeError, ExchangeFuture};
use burrow_fuzz::Reader;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use libfuzzer_sys::fuzz_target;

const CLUSTER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 53);
const CORP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 240, 53)), 53);
const STUB_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 2));
/// Queries (and clock steps) per input: enough for the cache and the
/// encoded-answer paths, few enough to keep executions cheap.
const MAX_OPS: usize = 12;

/// Answers every question at once, deterministically from the name.
struct Zone;

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("literal name")
}

fn answer(qname: &Name, qtype: RecordType) -> Result<Message, ExchangeError> {
    let first = qname
        .iter()
        .next()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .unwrap_or_default();
    let ttl = (qname.len() as u32).wrapping_mul(37) % 400;
    let mut m = Message::new(0, MessageType::Response, OpCode::Query);
    m.add_query(Query::query(qname.clone(), qtype));
    let rec = |data: RData| Record::from_rdata(qname.clone(), ttl, data);
    if first.starts_with("err") {
        return Err(ExchangeError::NoServers);
    }
    if first.starts_with("fail") {
        m.metadata.response_code = ResponseCode::ServFail;
        return Ok(m);
    }
    if first.starts_with("nx") {
        m.metadata.response_code = ResponseCode::NXDomain;
        m.authorities.push(Record::from_rdata(
            name("cluster.local."),
            ttl,
            RData::SOA(SOA::new(
                name("ns.cluster.local."),
                name("hostmaster.cluster.local."),
                1,
                7200,
                1800,
                86400,
                ttl / 2,
            )),
        ));
        return Ok(m);
    }
    if first.starts_with("big") {
        for i in 0..100 {
            m.answers.push(rec(RData::A(A::new(10, 244, 1, i))));
        }
        return Ok(m);
    }
    if first.starts_with('c') {
        let target = name("target.default.svc.cluster.local.");
        m.answers.push(rec(RData::CNAME(CNAME(target.clone()))));
        m.answers.push(Record::from_rdata(
            target,
            ttl,
            RData::A(A::new(10, 96, 0, 9)),
        ));
        return Ok(m);
    }
    let data = match qtype {
        RecordType::A => RData::A(A::new(10, 96, 0, (ttl % 250) as u8)),
        RecordType::AAAA if first.contains("v6") => {
            RData::AAAA(AAAA::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))
        }
        RecordType::AAAA => {
            m.metadata.response_code = ResponseCode::NXDomain;
            return Ok(m);
        }
        RecordType::SRV => RData::SRV(SRV::new(
            0,
            100,
            8080,
            name("echo.default.svc.cluster.local."),
        )),
        RecordType::PTR => RData::PTR(PTR(name("web.default.svc.cluster.local."))),
        RecordType::TXT => RData::TXT(TXT::new(vec![first.clone(), "x".repeat(200)])),
        RecordType::MX => RData::MX(MX::new(10, name("mail.example."))),
        _ => return Ok(m),
    };
    m.answers.push(rec(data));
    Ok(m)
}

impl Exchange for Zone {
    fn exchange<'a>(
        &'a self,
        servers: &'a [SocketAddr],
        qname: &'a Name,
        qtype: RecordType,
    ) -> ExchangeFuture<'a> {
        let r = if servers.is_empty() {
            Err(ExchangeError::NoServers)
        } else {
            answer(qname, qtype)
        };
        Box::pin(std::future::ready(r))
    }
}

/// Polls a future that never waits (the zone answers at once).
fn run<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..4 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

fn source(choice: u8) -> IpAddr {
    match choice % 7 {
        0 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        1 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        2 => IpAddr::V6(Ipv4Addr::new(127, 0, 0, 53).to_ipv6_mapped()),
        3 => STUB_ADDR,
        4 => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
        5 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)),
        _ => IpAddr::V4(Ipv4Addr::new(198, 19, 0, 3)),
    }
}

fn check(query: &[u8], reply: &[u8], transport: Transport) {
    assert!(reply.len() >= 12, "a reply has a header");
    assert_eq!(reply[..2], query[..2], "the reply carries the query's ID");
    assert!(reply[2] & 0x80 != 0, "the reply is a response");
    if transport == Transport::Udp {
        assert!(reply.len() <= 1232, "UDP reply of {} bytes", reply.len());
    }
    let m = Message::from_vec(reply).expect("the stub's replies parse");
    assert_eq!(m.metadata.message_type, MessageType::Response);
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let setup = r.u8();
    let view = ClusterView {
        domain: name(if setup & 1 == 0 {
            "cluster.local."
        } else {
            "corp.internal."
        }),
        namespace: "default".into(),
        namespaces: (setup & 2 == 0).then(|| {
            ["default", "data", "com"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        }),
        networks: vec![
            "10.96.0.0/12".parse().expect("literal"),
            "fd00::/64".parse().expect("literal"),
        ],
    };
    let stub = Stub::new(
        Config {
            view,
            cluster_dns: vec![CLUSTER],
            upstreams: if setup & 4 == 0 {
                vec![CORP]
            } else {
                Vec::new()
            },
            allowed_sources: vec![STUB_ADDR],
        },
        Arc::new(Zone),
    );
    let base = Instant::now();
    let mut now = base;
    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = r.u8();
        if op & 0xe0 == 0xe0 {
            // Time passes (up to ~18 minutes): TTLs tick, entries expire.
            now += Duration::from_millis(u64::from(r.u16()) * 16);
            continue;
        }
        let src = source(op);
        let transport = if op & 0x08 == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let query = r.piece(4096);
        match stub.step(query, src, transport, now) {
            Step::Reply(reply) => check(query, &reply, transport),
            Step::Drop => assert!(query.len() < 12 || query[2] & 0x80 != 0),
            Step::Resolve(p) => {
                if let Some(reply) = run(stub.resolve(p)) {
                    check(query, &reply, transport);
                }
            }
        }
        if op & 0x10 != 0 {
            // The namespace list changes (refreshed every 30 s).
            stub.set_namespaces((op & 0x04 == 0).then(|| ["default".to_string()].into()));
        }
    }
    let _ = stub.stats();
});
