//! Load target for `bench/httproute.sh`: the header-routing proxy and the
//! global-mode splice on loopback, in front of one upstream HTTP server.
//!
//! ```text
//! httproute_bench proxy --upstream 127.0.0.1:18480
//!     prints `header=ADDR splice=ADDR full=ADDR` once all listen, serves
//!     until killed. Header mode (as the gateway runs it: the pass-through,
//!     handing the full proxy what it does not carry): `x-burrow-route:
//!     bench` goes to the upstream as a "laptop"; everything else to the
//!     same upstream as the "cluster". `full` is the full proxy alone
//!     (hyper for every request), for comparison.
//! httproute_bench upstream
//!     a hyper HTTP/1.1 server answering every request with a short body;
//!     prints `upstream=ADDR` (for machines without nginx).
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use burrow_gateway::httproute::{self, BoxIo, Dial, DialFuture, Rule, Rules, Upstream};
use burrow_gateway::passthrough;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

struct TcpDial;

impl Dial for TcpDial {
    fn dial(&self, to: &Upstream) -> DialFuture<'_> {
        let addr = match to {
            Upstream::Laptop { addr, .. } | Upstream::Cluster(addr) => *addr,
        };
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxIo)
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["proxy", "--upstream", addr] => {
            let upstream: SocketAddr = addr
                .parse()
                .with_context(|| format!("--upstream {addr}: not an IP:port"))?;
            proxy(upstream).await
        }
        ["upstream"] => serve_upstream().await,
        _ => bail!("usage: httproute_bench proxy --upstream IP:PORT | httproute_bench upstream"),
    }
}

async fn proxy(upstream: SocketAddr) -> anyhow::Result<()> {
    let rules = Rules {
        rules: vec![Rule {
            header: HeaderName::from_static("x-burrow-route"),
            value: HeaderValue::from_static("bench"),
            to: Upstream::Laptop {
                name: "bench".into(),
                addr: upstream,
            },
            fallback: burrow_api::Fallback::Error,
        }],
        fallback: Upstream::Cluster(upstream),
    };
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let dial: Arc<dyn Dial> = Arc::new(TcpDial);
    let header = TcpListener::bind("127.0.0.1:0").await?;
    let splice = TcpListener::bind("127.0.0.1:0").await?;
    let full = TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "header={} splice={} full={}",
        header.local_addr()?,
        splice.local_addr()?,
        full.local_addr()?
    );
    let r = tokio::try_join!(
        header_mode(header, rules_rx.clone(), dial.clone(), false),
        header_mode(full, rules_rx, dial.clone(), true),
        splice_mode(splice, upstream, dial),
    );
    r.context("accepting connections")?;
    Ok(())
}

async fn header_mode(
    listener: TcpListener,
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
    full_proxy_only: bool,
) -> std::io::Result<()> {
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let (rules, dial) = (rules.clone(), dial.clone());
        tokio::spawn(async move {
            let served = if full_proxy_only {
                httproute::serve(Box::new(s), rules, dial).await
            } else {
                passthrough::serve(s, rules, dial).await
            };
            if let Err(e) = served {
                tracing::debug!("{e}");
            }
        });
    }
}

async fn splice_mode(
    listener: TcpListener,
    upstream: SocketAddr,
    dial: Arc<dyn Dial>,
) -> std::io::Result<()> {
    let to = Arc::new(Upstream::Laptop {
        name: "bench".into(),
        addr: upstream,
    });
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let (to, dial) = (to.clone(), dial.clone());
        tokio::spawn(async move {
            if let Err(e) = httproute::splice_or_502(Box::new(s), &*dial, &to).await {
                tracing::debug!("{e}");
            }
        });
    }
}

async fn serve_upstream() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("upstream={}", listener.local_addr()?);
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"hello from upstream\n",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), service)
                .await;
        });
    }
}
