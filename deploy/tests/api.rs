//! burrow-deploy against the stand-in API server on loopback: install,
//! find, upgrade-in-place, cluster ranges, errors, uninstall. (Pods do not
//! run here — the end-to-end tests in the miniature cluster cover readiness
//! and port-forward.)

use burrow_deploy::install::{self, InstallOptions};
use burrow_deploy::{Target, facts};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use minicluster_apiserver::local::LocalServer;

fn target(path: &std::path::Path) -> Target {
    Target {
        kubeconfig: Some(path.to_path_buf()),
        ..Default::default()
    }
}

#[tokio::test]
async fn install_find_and_uninstall() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(dir.path()).await?;
    let cluster = target(&server.kubeconfig).resolve().await?;
    cluster.check_reachable().await?;

    assert!(install::find(&cluster, "burrow-system").await?.is_none());
    let opts = InstallOptions {
        namespace: "burrow-system".into(),
        image: "burrow-gateway:test".into(),
    };
    let steps = std::sync::Mutex::new(Vec::new());
    install::apply(&cluster, &opts, &|s| {
        steps.lock().expect("lock").push(s.to_string())
    })
    .await?;
    assert!(
        steps
            .lock()
            .expect("lock")
            .iter()
            .any(|s| s == "applying Deployment burrow-gateway"),
        "{steps:?}"
    );
    let found = install::find(&cluster, "burrow-system")
        .await?
        .expect("installed");
    assert_eq!(found.version, install::VERSION);
    assert_eq!(found.image, "burrow-gateway:test");

    // The key Secret exists and survives a re-apply (an upgrade).
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), "burrow-system");
    let key_before = secrets.get(install::CONFIG_SECRET).await?.data;
    let upgraded = InstallOptions {
        image: "burrow-gateway:test2".into(),
        ..opts.clone()
    };
    install::apply(&cluster, &upgraded, &|_| {}).await?;
    assert_eq!(secrets.get(install::CONFIG_SECRET).await?.data, key_before);
    let found = install::find(&cluster, "burrow-system")
        .await?
        .expect("installed");
    assert_eq!(found.image, "burrow-gateway:test2");

    let (wg, framed) = install::node_ports(&cluster, "burrow-system").await?;
    assert!(wg.is_some_and(|p| (30000..=32767).contains(&p)), "{wg:?}");
    assert!(framed.is_some());

    install::uninstall(&cluster, "burrow-system", &|_| {}).await?;
    assert!(install::find(&cluster, "burrow-system").await?.is_none());
    assert!(secrets.get_opt(install::CONFIG_SECRET).await?.is_none());
    // Idempotent.
    install::uninstall(&cluster, "burrow-system", &|_| {}).await?;
    Ok(())
}

#[tokio::test]
async fn service_range_comes_from_the_api_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(dir.path()).await?;
    let cluster = target(&server.kubeconfig).resolve().await?;
    let r = facts::ranges(&cluster).await?;
    assert_eq!(r.service, vec!["10.96.0.0/12".parse()?]);
    assert_eq!(r.service_source, "the API server's Service IP range");
    Ok(())
}

#[tokio::test]
async fn a_user_without_rights_gets_a_403_with_a_hint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(dir.path()).await?;
    let nobody = server.kubeconfig_for("nobody", &[])?;
    let cluster = target(&nobody).resolve().await?;
    let err = install::apply(&cluster, &InstallOptions::default(), &|_| {})
        .await
        .expect_err("nobody may not install");
    assert!(err.is_forbidden(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cannot apply Namespace burrow-system"),
        "{text}"
    );
    assert!(text.contains("hint: ask a cluster admin"), "{text}");
    Ok(())
}
