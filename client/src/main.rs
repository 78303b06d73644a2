//! `burrow`: the laptop side of burrow — CLI, background daemon, TUN device,
//! routes, DNS configuration, reroute forwarders, `env`/`run`.
//!
//! Must never: leave a device, route or resolver change behind after
//! `disconnect` or a crash, or change the cluster with anything but the
//! user's own credentials.

use clap::Parser;

/// Make a Kubernetes cluster's network part of this machine.
#[derive(Parser)]
#[command(name = "burrow", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!(
        "burrow: no command is built yet; `burrow connect` arrives with the data path (see ARCHITECTURE.md)"
    )
}
