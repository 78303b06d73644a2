//! The stub's query handling against an in-memory cluster DNS and
//! "corporate" resolver (no sockets): routing, renaming, AAAA, cache,
//! negative cache, single-flight, truncation, refusals; and a bounded
//! proptest fuzz of hostile input (runs in `cargo test`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_dns::route::ClusterView;
use burrow_dns::stub::{Config, Step, Stub, Transport};
use burrow_dns::upstream::{Exchange, ExchangeFuture};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use proptest::prelude::*;

const CLUSTER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 53);
const CORP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 240, 53)), 53);
const LAPTOP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("literal")
}

/// Two zones; like a strict server, a name without records of the asked
/// type is NXDOMAIN (the stub must still answer AAAA with NOERROR).
#[derive(Default)]
struct Zones {
    records: HashMap<(SocketAddr, Name), Vec<Record>>,
    asked: Mutex<Vec<(SocketAddr, Name, RecordType)>>,
    calls: AtomicUsize,
    delay: Option<Duration>,
}

impl Zones {
    fn add(&mut self, server: SocketAddr, owner: &str, data: RData) {
        let n = name(owner);
        self.records
            .entry((server, n.clone()))
            .or_default()
            .push(Record::from_rdata(n, 5, data));
    }

    fn standard() -> Self {
        let mut z = Zones::default();
        let d = "svc.cluster.local.";
        z.add(
            CLUSTER,
            &format!("web.default.{d}"),
            RData::A(A::new(10, 96, 0, 30)),
        );
        z.add(
            CLUSTER,
            &format!("echo.default.{d}"),
            RData::A(A::new(10, 96, 0, 20)),
        );
        z.add(
            CLUSTER,
            &format!("redis.data.{d}"),
            RData::A(A::new(10, 96, 0, 40)),
        );
        z.add(
            CLUSTER,
            &format!("db-0.db.data.{d}"),
            RData::A(A::new(10, 244, 0, 8)),
        );
        z.add(
            CLUSTER,
            &format!("_http._tcp.echo.default.{d}"),
            RData::SRV(SRV::new(0, 100, 8080, name(&format!("echo.default.{d}")))),
        );
        z.add(
            CLUSTER,
            "30.0.96.10.in-addr.arpa.",
            RData::PTR(PTR(name(&format!("web.default.{d}")))),
        );
        for i in 0..100 {
            z.add(
                CLUSTER,
                &format!("big.default.{d}"),
                RData::A(A::new(10, 244, 1, i)),
            );
        }
        z.add(
            CORP,
            "intranet.example.",
            RData::A(A::new(192, 168, 240, 80)),
        );
        z.add(CORP, "wiki.", RData::A(A::new(192, 168, 240, 81)));
        z
    }
}

impl Exchange for Zones {
    fn exchange<'a>(
        &'a self,
        servers: &'a [SocketAddr],
        qname: &'a Name,
        qtype: RecordType,
    ) -> ExchangeFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            let server = servers[0];
            if let Ok(mut a) = self.asked.lock() {
                a.push((server, qname.clone(), qtype));
            }
            let mut m = Message::new(0, MessageType::Response, OpCode::Query);
            m.add_query(Query::query(qname.clone(), qtype));
            let recs: Vec<Record> = self
                .records
                .get(&(server, qname.to_lowercase()))
                .map(|v| {
                    v.iter()
                        .filter(|r| r.record_type() == qtype)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if recs.is_empty() {
                m.metadata.response_code = ResponseCode::NXDomain;
            }
            m.answers = recs;
            Ok(m)
        })
    }
}

fn stub(zones: Zones) -> (Arc<Stub>, Arc<Zones>) {
    let zones = Arc::new(zones);
    let view = ClusterView {
        domain: name("cluster.local."),
        namespace: "default".into(),
        namespaces: Some(["default", "data"].iter().map(|s| s.to_string()).collect()),
        networks: vec!["10.96.0.0/12".parse().expect("literal")],
    };
    let s = Stub::new(
        Config {
            view,
            cluster_dns: vec![CLUSTER],
            upstreams: vec![CORP],
            allowed_sources: vec![],
        },
        zones.clone(),
    );
    (Arc::new(s), zones)
}

fn query(id: u16, qname: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

fn ask(s: &Stub, qname: &str, qtype: RecordType) -> Message {
    ask_over(s, qname, qtype, Transport::Udp, true)
}

fn ask_over(s: &Stub, qname: &str, qtype: RecordType, t: Transport, edns: bool) -> Message {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let bytes = query(0x4242, qname, qtype, edns);
    let r = rt.block_on(s.handle(&bytes, LAPTOP, t)).expect("an answer");
    let m = Message::from_vec(&r).expect("a valid answer");
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

fn a_records(m: &Message) -> Vec<(String, Ipv4Addr)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), a.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn cluster_names_answer_under_the_name_asked() {
    let (s, zones) = stub(Zones::standard());
    let m = ask(&s, "web.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        a_records(&m),
        vec![("web.".into(), Ipv4Addr::new(10, 96, 0, 30))]
    );
    let m = ask(&s, "Echo.Default.", RecordType::A);
    assert_eq!(m.queries[0].name().to_ascii(), "Echo.Default.");
    assert_eq!(
        a_records(&m),
        vec![("Echo.Default.".into(), Ipv4Addr::new(10, 96, 0, 20))]
    );
    let m = ask(&s, "db-0.db.data.svc.cluster.local.", RecordType::A);
    assert_eq!(a_records(&m)[0].1, Ipv4Addr::new(10, 244, 0, 8));
    let m = ask(
        &s,
        "_http._tcp.echo.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert!(matches!(&m.answers[0].data, RData::SRV(srv) if srv.port == 8080));
    let m = ask(&s, "30.0.96.10.in-addr.arpa.", RecordType::PTR);
    assert!(
        matches!(&m.answers[0].data, RData::PTR(p) if p.0 == name("web.default.svc.cluster.local."))
    );
    let asked = zones.asked.lock().expect("lock").clone();
    assert!(
        asked.iter().all(|(server, _, _)| *server == CLUSTER),
        "{asked:?}"
    );
}

#[test]
fn other_names_go_to_the_laptop_s_resolvers() {
    let (s, zones) = stub(Zones::standard());
    let m = ask(&s, "intranet.example.", RecordType::A);
    assert_eq!(
        a_records(&m),
        vec![("intranet.example.".into(), Ipv4Addr::new(192, 168, 240, 80))]
    );
    // A single label the cluster does not have falls through.
    let m = ask(&s, "wiki.", RecordType::A);
    assert_eq!(a_records(&m)[0].1, Ipv4Addr::new(192, 168, 240, 81));
    let asked = zones.asked.lock().expect("lock").clone();
    assert_eq!(
        asked,
        vec![
            (CORP, name("intranet.example."), RecordType::A),
            (
                CLUSTER,
                name("wiki.default.svc.cluster.local."),
                RecordType::A
            ),
            (CORP, name("wiki."), RecordType::A),
        ]
    );
    // A missing name in a namespace is the cluster's NXDOMAIN.
    let m = ask(&s, "nosuch.default.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn aaaa_of_an_ipv4_only_cluster_name_is_empty_noerror() {
    let (s, _) = stub(Zones::standard());
    let m = ask(&s, "web.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = ask(&s, "nosuch.default.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn cache_and_negative_cache() {
    let (s, zones) = stub(Zones::standard());
    ask(&s, "web.default.svc.cluster.local.", RecordType::A);
    ask(&s, "WEB.default.svc.cluster.local.", RecordType::A);
    ask(&s, "nosuch.default.", RecordType::A);
    ask(&s, "nosuch.default.", RecordType::A);
    assert_eq!(zones.calls.load(Ordering::SeqCst), 2);
    let st = s.stats();
    assert_eq!((st.hits, st.misses), (2, 2));
    // TTLs count down from the time the answer was cached.
    let later = Instant::now() + Duration::from_secs(3);
    let q = query(7, "web.default.svc.cluster.local.", RecordType::A, false);
    match s.step(&q, LAPTOP, Transport::Udp, later) {
        Step::Reply(r) => {
            let m = Message::from_vec(&r).expect("valid");
            assert!(m.answers[0].ttl <= 2, "ttl {}", m.answers[0].ttl);
        }
        other => panic!("expected a cached reply, got {other:?}"),
    }
    // Expired: a miss again.
    let q = query(8, "web.default.svc.cluster.local.", RecordType::A, false);
    assert!(matches!(
        s.step(
            &q,
            LAPTOP,
            Transport::Udp,
            Instant::now() + Duration::from_secs(6)
        ),
        Step::Resolve(_)
    ));
}

#[test]
fn repeated_queries_reuse_the_encoded_answer_with_their_own_id() {
    let (s, _) = stub(Zones::standard());
    ask(&s, "echo.default.", RecordType::A);
    let t0 = Instant::now();
    let reply = |id: u16, at: Instant| match s.step(
        &query(id, "echo.default.", RecordType::A, true),
        LAPTOP,
        Transport::Udp,
        at,
    ) {
        Step::Reply(r) => r,
        other => panic!("expected a cached reply, got {other:?}"),
    };
    let a = reply(100, t0);
    let b = reply(200, t0);
    assert_eq!(&a[..2], &100u16.to_be_bytes());
    assert_eq!(&b[..2], &200u16.to_be_bytes());
    assert_eq!(a[2..], b[2..]);
    // Two seconds on, the TTL has ticked down: not the same bytes.
    let c = Message::from_vec(&reply(300, t0 + Duration::from_secs(2))).expect("valid");
    let first = Message::from_vec(&a).expect("valid");
    assert!(c.answers[0].ttl < first.answers[0].ttl);
    assert_eq!(s.stats().hits, 3);
}

#[test]
fn identical_concurrent_queries_are_asked_once() {
    let mut z = Zones::standard();
    z.delay = Some(Duration::from_millis(50));
    let (s, zones) = stub(z);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    let answers = rt.block_on(async {
        let mut tasks = Vec::new();
        for id in 0..50u16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let q = query(id, "echo.default.", RecordType::A, true);
                let r = s.handle(&q, LAPTOP, Transport::Udp).await.expect("answer");
                let m = Message::from_vec(&r).expect("valid");
                (m.metadata.id, a_records(&m))
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    assert_eq!(zones.calls.load(Ordering::SeqCst), 1);
    for (i, (id, recs)) in answers.into_iter().enumerate() {
        assert_eq!(usize::from(id), i);
        assert_eq!(
            recs,
            vec![("echo.default.".into(), Ipv4Addr::new(10, 96, 0, 20))]
        );
    }
}

#[test]
fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let (s, _) = stub(Zones::standard());
    let m = ask_over(&s, "big.default.", RecordType::A, Transport::Udp, false);
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let m = ask_over(&s, "big.default.", RecordType::A, Transport::Udp, true);
    assert!(m.metadata.truncation, "100 A records exceed 1232 bytes");
    let m = ask_over(&s, "big.default.", RecordType::A, Transport::Tcp, false);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
}

fn rcode_of(s: &Stub, bytes: &[u8], src: IpAddr) -> Option<ResponseCode> {
    match s.step(bytes, src, Transport::Udp, Instant::now()) {
        Step::Reply(r) => {
            assert_eq!(&r[..2], &bytes[..2], "the reply keeps the query's ID");
            Some(ResponseCode::from_low(r[3] & 0x0f))
        }
        Step::Drop => None,
        Step::Resolve(_) => Some(ResponseCode::NoError),
    }
}

#[test]
fn hostile_queries_are_refused_or_formerr() {
    let (s, zones) = stub(Zones::standard());
    let good = query(1, "web.", RecordType::A, false);
    // Not from this machine: refused.
    assert_eq!(
        rcode_of(&s, &good, "192.168.240.9".parse().expect("literal")),
        Some(ResponseCode::Refused)
    );
    // Too short for a header, or a response: silence.
    assert_eq!(rcode_of(&s, &good[..11], LAPTOP), None);
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(rcode_of(&s, &resp, LAPTOP), None);
    // A header promising a question that is not there.
    assert_eq!(
        rcode_of(&s, &good[..14], LAPTOP),
        Some(ResponseCode::FormErr)
    );
    // Two questions.
    let mut two = Message::new(2, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(name("a."), RecordType::A));
    two.add_query(Query::query(name("b."), RecordType::A));
    assert_eq!(
        rcode_of(&s, &two.to_vec().expect("encode"), LAPTOP),
        Some(ResponseCode::FormErr)
    );
    // Zone transfers, ANY, CHAOS: refused.
    for t in [RecordType::AXFR, RecordType::ANY] {
        assert_eq!(
            rcode_of(&s, &query(3, "web.", t, false), LAPTOP),
            Some(ResponseCode::Refused)
        );
    }
    let mut chaos = Message::new(4, MessageType::Query, OpCode::Query);
    let mut q = Query::query(name("version.bind."), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    assert_eq!(
        rcode_of(&s, &chaos.to_vec().expect("encode"), LAPTOP),
        Some(ResponseCode::Refused)
    );
    // Updates and other opcodes: not implemented.
    let mut upd = good.clone();
    upd[2] = (upd[2] & 0x87) | (5 << 3);
    assert_eq!(rcode_of(&s, &upd, LAPTOP), Some(ResponseCode::NotImp));
    assert_eq!(zones.calls.load(Ordering::SeqCst), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Any bytes at all: no panic; any reply is a DNS response with the
    /// query's ID.
    #[test]
    fn fuzz_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let (s, _) = stub(Zones::standard());
        if let Step::Reply(r) = s.step(&bytes, LAPTOP, Transport::Udp, Instant::now()) {
            prop_assert!(r.len() >= 12);
            prop_assert_eq!(&r[..2], &bytes[..2]);
            prop_assert!(r[2] & 0x80 != 0);
        }
    }
}

fn mutated_query() -> impl Strategy<Value = Vec<u8>> {
    let labels = proptest::collection::vec("[a-zA-Z0-9-]{1,20}", 1..6);
    (
        labels,
        prop_oneof![Just("default"), Just("data"), Just("svc"), Just("example")],
        any::<u16>(),
        any::<bool>(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        0usize..40,
    )
        .prop_map(|(labels, suffix, qtype, edns, flips, cut)| {
            let mut n = labels.join(".");
            n.push('.');
            n.push_str(suffix);
            n.push('.');
            let mut m = Message::new(9, MessageType::Query, OpCode::Query);
            let qname = Name::from_ascii(&n).unwrap_or_else(|_| Name::root());
            m.add_query(Query::query(qname, RecordType::from(qtype)));
            if edns {
                m.set_edns(Edns::new());
            }
            let mut b = m.to_vec().unwrap_or_default();
            for (i, v) in flips {
                if !b.is_empty() {
                    let i = i % b.len();
                    b[i] = v;
                }
            }
            let keep = b.len().saturating_sub(cut % 8);
            if cut >= 32 {
                b.truncate(keep);
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// Near-valid queries all the way through resolution (in-memory
    /// zones): no panic, every answer decodes and carries the ID.
    #[test]
    fn fuzz_near_valid_queries(bytes in mutated_query()) {
        let (s, _) = stub(Zones::standard());
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        for t in [Transport::Udp, Transport::Tcp] {
            if let Some(r) = rt.block_on(s.handle(&bytes, LAPTOP, t)) {
                prop_assert!(r.len() >= 12);
                prop_assert_eq!(&r[..2], &bytes[..2]);
                if t == Transport::Udp {
                    prop_assert!(r.len() <= 1232);
                }
                // Full answers must decode; header-only errors have no body.
                if r.len() > 12 {
                    prop_assert!(Message::from_vec(&r).is_ok());
                }
            }
        }
    }
}
