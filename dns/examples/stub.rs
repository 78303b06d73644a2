//! The stub on its own, for benchmarks (`scripts/bench-dns.sh` with
//! STUB_RELEASE=1): `stub LISTEN CLUSTER_DNS UPSTREAM DOMAIN NAMESPACE`,
//! e.g. `stub 127.0.0.53:53 10.96.0.10:53 192.168.240.53:53 cluster.local default`.
//! Namespaces unknown (probe mode); runs until killed.

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_dns::{ClusterView, Config, Network, Server, Stub};
use hickory_proto::rr::Name;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, cluster, upstream, domain, namespace] = args.as_slice() else {
        return Err("usage: stub LISTEN CLUSTER_DNS UPSTREAM DOMAIN NAMESPACE".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let config = Config {
        view: ClusterView {
            domain: Name::from_ascii(format!("{}.", domain.trim_end_matches('.')))?,
            namespace: namespace.clone(),
            namespaces: None,
            networks: Vec::new(),
        },
        cluster_dns: vec![cluster.parse()?],
        upstreams: vec![upstream.parse()?],
        allowed_sources: vec![listen.ip()],
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let stub = Arc::new(Stub::new(config, Arc::new(Network)));
        let _server = Server::start(stub, listen).await?;
        println!("stub listening on {listen}");
        std::future::pending::<()>().await;
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
