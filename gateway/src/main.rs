//! `burrow-gateway`: the in-cluster end of burrow's tunnel.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("burrow-gateway: the data path is not built yet (see issue 3)")
}
