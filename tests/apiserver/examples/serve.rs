//! Serves a stand-in API server on 127.0.0.1 for poking at it by hand:
//! `cargo run -p minicluster-apiserver --example serve -- DIR`, then
//! `kubectl --kubeconfig DIR/admin.kubeconfig get pods -A`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("minicluster-apiserver"));
    let server = minicluster_apiserver::local::LocalServer::start(&dir).await?;
    println!(
        "serving {} ; kubeconfig {}",
        server.url,
        server.kubeconfig.display()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
