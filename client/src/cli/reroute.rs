//! `burrow reroute`, the command: parses what the user asks, hands it to
//! the daemon (`protocol::Request::Reroute`, `RerouteStop`, `RerouteList`)
//! and prints what comes back. The work is the daemon's
//! (`daemon::reroute`). Before anything starts, with the user's own
//! credentials (`burrow_deploy::reroute`): the kubeconfig names the
//! connection's API server, the cluster serves `discovery.k8s.io/v1`, the
//! Service and port exist (errors list what does), the transport fits the
//! route (a header reroute is HTTP, so never a UDP port), the user may
//! patch the Service (a dry run; a 403 names what to ask for); and a
//! warning when Argo CD or Flux owns the Service.

use std::time::Duration;

use anyhow::Context as _;
use burrow_api::{Fallback, Protocol};
use clap::Args;

use crate::protocol::{Listed, Spec, Stop};

/// Reroute a cluster Service port to this machine.
#[derive(Args, Debug)]
pub struct RerouteArgs {
    /// The Service to reroute.
    #[arg(required_unless_present_any = ["list", "stop", "all"])]
    service: Option<String>,
    #[command(flatten)]
    cluster: crate::cli::connect::ClusterArgs,
    /// SVCPORT[:LOCALPORT]: the Service port (number or name; a number may
    /// say /udp or /tcp) and the local port on 127.0.0.1 that answers
    /// (default: the same number). A UDP port goes to the local UDP port.
    #[arg(long, value_name = "SVCPORT[:LOCALPORT]")]
    port: Option<String>,
    /// Only requests carrying this header go to this machine (HTTP/1.1 and
    /// h2c); the rest keep reaching the cluster's pods.
    #[arg(long, value_name = "NAME=VALUE")]
    header: Option<String>,
    /// What callers get when nothing listens on the local port: auto
    /// tells HTTP callers (HTTP/1 request line, HTTP/2 preface) from
    /// others by their first bytes; http: 502 naming this machine; tcp: a
    /// reset. (If this machine cannot be reached at all, the cluster's pods
    /// answer, whatever this says.)
    #[arg(long, value_enum, default_value_t = ProtocolArg::Auto)]
    protocol: ProtocolArg,
    /// When nothing listens on the local port: `error` answers as
    /// --protocol says; `pods` sends the callers to the cluster's pods.
    #[arg(long, value_enum, value_name = "error|pods", default_value_t = FallbackArg::Error)]
    fallback: FallbackArg,
    /// Take over a port another laptop reroutes.
    #[arg(long)]
    force: bool,
    /// List this machine's reroutes.
    #[arg(long, conflicts_with_all = ["stop", "all"])]
    list: bool,
    /// Stop rerouting SERVICE and restore it.
    #[arg(long, value_name = "SERVICE", conflicts_with = "all")]
    stop: Option<String>,
    /// With --stop: every reroute of this machine.
    #[arg(long)]
    all: bool,
    #[arg(short, long, value_enum, default_value_t = crate::cli::connect::Output::Text)]
    output: crate::cli::connect::Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
enum ProtocolArg {
    Auto,
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
enum FallbackArg {
    Error,
    Pods,
}

pub(crate) fn parse_port(text: &str) -> anyhow::Result<(String, Option<u16>)> {
    match text.rsplit_once(':') {
        Some((svc, local)) => {
            let local = local
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| format!("--port {text}: LOCALPORT must be a port number"))?;
            Ok((svc.to_owned(), Some(local)))
        }
        // "9000/udp" answers on local port 9000 too.
        None => Ok((
            text.to_owned(),
            text.split('/').next().and_then(|n| n.parse().ok()),
        )),
    }
}

impl RerouteArgs {
    fn spec(&self) -> anyhow::Result<Spec> {
        let service = self
            .service
            .clone()
            .context("name the Service to reroute")?;
        let port = self
            .port
            .as_deref()
            .context("say which port with --port SVCPORT[:LOCALPORT]")?;
        let (svc_port, local) = parse_port(port)?;
        let local_port = local.with_context(|| {
            format!("--port {port}: give the local port too (--port {port}:LOCALPORT)")
        })?;
        let header = match &self.header {
            None => None,
            Some(h) => {
                let (n, v) = h
                    .split_once('=')
                    .with_context(|| format!("--header {h}: expected NAME=VALUE"))?;
                Some((n.trim().to_owned(), v.trim().to_owned()))
            }
        };
        let protocol = match (self.protocol, &header) {
            (_, Some(_)) | (ProtocolArg::Http, _) => Protocol::Http,
            (ProtocolArg::Tcp, None) => Protocol::Tcp,
            (ProtocolArg::Auto, None) => Protocol::Auto,
        };
        let fallback = match self.fallback {
            FallbackArg::Error => Fallback::Error,
            FallbackArg::Pods => Fallback::Pods,
        };
        Ok(Spec {
            namespace: self.cluster.namespace.clone(),
            service,
            port: svc_port,
            local_port,
            protocol,
            header,
            force: self.force,
            fallback,
        })
    }
}

/// `burrow reroute ...`.
pub fn run(args: RerouteArgs, global: &crate::Global) -> anyhow::Result<()> {
    crate::require_root("reroute", "it talks to the root-only daemon")?;
    let rt = crate::cli::connect::runtime()?;
    rt.block_on(async {
        // The connection's cluster is the one rerouted; naming another is
        // refused before anything is done.
        let connected = crate::cli::env::connection(global).await;
        let explicit = args.cluster.kubeconfig.is_some() || args.cluster.context.is_some();
        if let Some(st) = &connected
            && explicit
        {
            let named = args.cluster.target().resolve().await?;
            if named.server != st.server {
                anyhow::bail!(
                    "burrow is connected to {} (context {}), but this names {} (context {}): \
                     reroutes go through the connected cluster's gateway. Leave out \
                     --kubeconfig/--context to use the connection's, or `burrow disconnect` \
                     and connect to the other cluster first",
                    st.server,
                    st.context,
                    named.server,
                    named.context
                );
            }
        }
        if args.list {
            let conn = crate::cli::connect::daemon_conn(global).await?;
            let text =
                crate::cli::connect::exchange_message(conn, &crate::protocol::Request::RerouteList, false)
                    .await?;
            let list: Vec<Listed> = serde_json::from_str(&text).context("the daemon's list")?;
            match args.output {
                crate::cli::connect::Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&list)?)
                }
                crate::cli::connect::Output::Text => print_list(&list),
            }
            return Ok(());
        }
        if args.stop.is_some() || args.all {
            let stop = Stop {
                namespace: args.cluster.namespace.clone(),
                service: args.stop.clone(),
            };
            let conn = crate::cli::connect::daemon_conn(global).await?;
            let text = crate::cli::connect::exchange_message(
                conn,
                &crate::protocol::Request::RerouteStop(stop),
                true,
            )
            .await?;
            println!("{text}");
            return Ok(());
        }
        let mut spec = args.spec()?;
        // What can be known with the user's credentials alone is checked
        // before anything starts: the Service, the port, the permission.
        // Given no kubeconfig, the one `connect` used (and its context and
        // namespace), as the daemon will.
        let target = crate::cli::env::target_with_connection(&args.cluster, connected.as_ref());
        if spec.namespace.is_none() {
            spec.namespace = target.namespace.clone();
        }
        let cluster = target.resolve().await?;
        let namespace = spec
            .namespace
            .clone()
            .unwrap_or_else(|| cluster.namespace.clone());
        if let Some(st) = &connected
            && cluster.server != st.server
        {
            anyhow::bail!(
                "burrow is connected to {} (context {}), but your kubeconfig names {} (context {}): \
                 reroutes go through the connected cluster's gateway. Use --kubeconfig/--context \
                 for the connection's cluster, or `burrow disconnect` and connect to this one first",
                st.server,
                st.context,
                cluster.server,
                cluster.context
            );
        }
        burrow_deploy::reroute::check_cluster_supports(&cluster).await?;
        let found =
            burrow_deploy::reroute::find(&cluster, &namespace, &spec.service, &spec.port).await?;
        found.protocol(spec.protocol, spec.header.is_some())?;
        burrow_deploy::reroute::check_may_patch(&cluster, &found.service).await?;
        if let Some(w) = burrow_deploy::reroute::gitops_warning(&found.service) {
            eprintln!("warning: {w}");
        }
        // Connect first when needed (a no-op when connected).
        crate::cli::connect::connect_quietly(&args.cluster, global).await?;
        let conn = crate::cli::connect::daemon_conn(global).await?;
        let text =
            crate::cli::connect::exchange_message(conn, &crate::protocol::Request::Reroute(spec), true)
                .await?;
        println!("{text}");
        Ok(())
    })
}

fn print_list(list: &[Listed]) {
    if list.is_empty() {
        println!("no reroutes");
        return;
    }
    println!(
        "{:<28} {:<7} {:<28} {:<9} {:<12} SINCE",
        "SERVICE", "PORT", "ROUTE", "PROTO", "LOCAL"
    );
    for l in list {
        let r = &l.reroute;
        let route = match &r.header {
            Some((n, v)) => format!("{n}={v}"),
            None => "all".into(),
        };
        let local = match l.local_port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "-".into(),
        };
        // `auto+pods`: `--fallback pods`.
        let proto = match r.fallback {
            Fallback::Pods => format!("{}+pods", r.protocol.as_str()),
            Fallback::Error => r.protocol.as_str().to_string(),
        };
        println!(
            "{:<28} {:<7} {:<28} {:<9} {:<12} {}",
            format!("{}/{}", r.namespace, r.service),
            r.port,
            route,
            proto,
            local,
            humantime::format_rfc3339_seconds(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(r.since)
            )
        );
        if let Some(c) = &r.changed {
            println!("  ! {c}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(
            parse_port("8080:3000").expect("ok"),
            ("8080".into(), Some(3000))
        );
        assert_eq!(
            parse_port("http:3000").expect("ok"),
            ("http".into(), Some(3000))
        );
        assert_eq!(parse_port("8080").expect("ok"), ("8080".into(), Some(8080)));
        assert_eq!(parse_port("http").expect("ok"), ("http".into(), None));
        assert!(parse_port("8080:x").is_err());
        assert_eq!(
            parse_port("53/udp:5353").expect("ok"),
            ("53/udp".into(), Some(5353))
        );
        assert_eq!(
            parse_port("53/udp").expect("ok"),
            ("53/udp".into(), Some(53))
        );
    }
}
