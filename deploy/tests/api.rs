//! burrow-deploy against the stand-in API server on loopback: install,
//! find, upgrade-in-place, cluster ranges, errors, uninstall. (Pods do not
//! run here — the end-to-end tests in the miniature cluster cover readiness
//! and port-forward.)

use burrow_deploy::install::{self, InstallOptions};
use burrow_deploy::{Target, facts};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::api::{Api, Patch, PatchParams, PostParams};
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
        metrics_namespace: Some("monitoring".into()),
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
    // An upgrade that names no metrics namespace (`burrow connect`'s)
    // keeps the one the admin chose.
    let upgraded = InstallOptions {
        image: "burrow-gateway:test2".into(),
        metrics_namespace: None,
        ..opts.clone()
    };
    install::apply(&cluster, &upgraded, &|_| {}).await?;
    assert_eq!(secrets.get(install::CONFIG_SECRET).await?.data, key_before);
    let policies: Api<NetworkPolicy> = Api::namespaced(cluster.client.clone(), "burrow-system");
    let policy = policies.get(install::NETWORK_POLICY).await?;
    let annotations = policy.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get(install::METRICS_NAMESPACE_ANNOTATION)
            .map(String::as_str),
        Some("monitoring")
    );
    let text = serde_json::to_string(&policy.spec)?;
    assert!(
        text.contains(r#""kubernetes.io/metadata.name":"monitoring""#),
        "{text}"
    );
    // The developers' roles are there, bound to nobody.
    let roles: Api<ClusterRole> = Api::all(cluster.client.clone());
    for name in [
        install::REROUTE_ROLE,
        install::CONNECT_CLUSTER_ROLE,
        "burrow-gateway",
    ] {
        assert!(roles.get_opt(name).await?.is_some(), "ClusterRole {name}");
    }
    let role: Api<Role> = Api::namespaced(cluster.client.clone(), "burrow-system");
    assert!(role.get_opt(install::CONNECT_ROLE).await?.is_some());
    assert!(install::user_bindings(&cluster).await.is_empty());
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
    assert!(policies.get_opt(install::NETWORK_POLICY).await?.is_none());
    for name in [
        install::REROUTE_ROLE,
        install::CONNECT_CLUSTER_ROLE,
        "burrow-gateway",
    ] {
        assert!(
            roles.get_opt(name).await?.is_none(),
            "ClusterRole {name} left"
        );
    }
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

/// What a developer bound only to the shipped roles (connect in the
/// gateway's namespace, reroute in `team`) gets from what connect asks:
/// the gateway found, the ranges from the fallbacks that need no
/// cluster-wide right, and 403s that say what is missing.
#[tokio::test]
async fn a_developer_with_the_shipped_roles_learns_what_connect_needs() -> anyhow::Result<()> {
    use serde_json::json;
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(dir.path()).await?;
    let admin = target(&server.kubeconfig).resolve().await?;
    install::apply(&admin, &InstallOptions::default(), &|_| {}).await?;
    let create = |api_version: &str, kind: &str, ns: Option<&str>, body: serde_json::Value| {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            group, version, kind,
        ));
        let api: Api<kube::api::DynamicObject> = match ns {
            Some(ns) => Api::namespaced_with(admin.client.clone(), ns, &ar),
            None => Api::all_with(admin.client.clone(), &ar),
        };
        async move {
            let obj: kube::api::DynamicObject = serde_json::from_value(body)?;
            api.create(&PostParams::default(), &obj).await?;
            anyhow::Ok(())
        }
    };
    create(
        "v1",
        "Namespace",
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}),
    )
    .await?;
    let binding = |ns: &str, name: &str, kind: &str, role: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": name, "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dana"}]})
    };
    create(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        Some("burrow-system"),
        binding(
            "burrow-system",
            "dana-connect",
            "Role",
            install::CONNECT_ROLE,
        ),
    )
    .await?;
    create(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        Some("team"),
        binding("team", "dana-reroute", "ClusterRole", install::REROUTE_ROLE),
    )
    .await?;
    // A pod's address, as the endpoint controller publishes it.
    create(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("team"),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-abcde", "labels": {
                   "kubernetes.io/service-name": "web",
                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.3.7"], "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "team"}}],
               "ports": [{"port": 80, "protocol": "TCP"}]}),
    )
    .await?;
    // Someone else's slice of a selector-less Service: not a pod range.
    create(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        Some("team"),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "external", "labels": {"kubernetes.io/service-name": "external"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["192.0.2.10"]}],
               "ports": [{"port": 80, "protocol": "TCP"}]}),
    )
    .await?;

    let kc = server.kubeconfig_for("dana", &[])?;
    let dana = Target {
        kubeconfig: Some(kc),
        namespace: Some("team".into()),
        ..Default::default()
    }
    .resolve()
    .await?;
    let found = install::find(&dana, "burrow-system").await?.expect("found");
    assert_eq!(found.version, install::VERSION);
    let (wg, _) = install::node_ports(&dana, "burrow-system").await?;
    assert!(wg.is_some());

    let r = facts::ranges(&dana).await?;
    assert_eq!(r.service, vec!["10.96.0.0/12".parse()?], "{r:?}");
    assert_eq!(r.pods, vec!["10.244.0.0/16".parse()?], "{r:?}");
    assert!(r.pods_source.contains("list nodes"), "{}", r.pods_source);

    // Nodes and namespaces are cluster-wide: 403, naming what is missing.
    let err = install::node_addresses(&dana).await.expect_err("403");
    assert!(err.is_forbidden());
    let text = err.to_string();
    assert!(text.contains("cannot list resource \"nodes\""), "{text}");
    assert!(
        text.contains("port-forward") && text.contains(install::CONNECT_CLUSTER_ROLE),
        "{text}"
    );
    let err = facts::namespaces(&dana).await.expect_err("403");
    assert!(
        err.to_string()
            .contains("cannot list resource \"namespaces\""),
        "{err}"
    );
    // Upgrading is the admin's.
    let err = install::apply(&dana, &InstallOptions::default(), &|_| {})
        .await
        .expect_err("403");
    assert!(err.is_forbidden(), "{err}");
    // Another namespace's Services are out of reach; team's are not.
    let other: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(dana.client.clone(), "default");
    let err = other.get("kubernetes").await.expect_err("403");
    assert!(matches!(err, kube::Error::Api(s) if s.code == 403));
    // Server-side apply of a new EndpointSlice: `patch` and `create`.
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(dana.client.clone(), "team");
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-burrow"}, "addressType": "IPv4", "endpoints": [], "ports": []});
    slices
        .patch(
            "web-burrow",
            &PatchParams::apply("burrow"),
            &Patch::Apply(&slice),
        )
        .await?;
    Ok(())
}

/// `burrow env`'s reads: the workload, its (missing) pod, what it refers
/// to, each missing or refused source kept for the environment to name.
#[tokio::test]
async fn a_workloads_sources_are_read_with_the_users_rights() -> anyhow::Result<()> {
    use burrow_deploy::podenv::Source;
    use burrow_deploy::workload::{self, Kind, ReadOptions, WorkloadRef};
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(dir.path()).await?;
    let admin = target(&server.kubeconfig).resolve().await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "api"},
                "spec": {"selector": {"matchLabels": {"app": "api"}},
                    "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{
                        "name": "api", "image": "x",
                        "resources": {"limits": {"memory": "64Mi"}},
                        "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}}],
                        "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}]
                    }]}}}
            }))?,
        )
        .await?;
    let cms: Api<ConfigMap> = Api::namespaced(admin.client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"K": "v"}}))?,
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(admin.client.clone(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "sec"}, "stringData": {"S": "x"}}),
            )?,
        )
        .await?;

    let wref: WorkloadRef = "api".parse().map_err(anyhow::Error::msg)?;
    let w = workload::find(&admin, "default", &wref).await?;
    assert_eq!(w.kind, Kind::Deployment);
    assert!(w.pod.is_none());
    assert_eq!(w.no_pod, "deploy/api has no pods");
    // Defaulted as a pod would be: requests from limits.
    let c = w.container(None)?.clone();
    let requests = c.resources.as_ref().and_then(|r| r.requests.clone());
    assert_eq!(
        requests.and_then(|r| r.get("memory").cloned()).map(|q| q.0),
        Some("64Mi".into())
    );
    let src = workload::read_sources(&admin, &w, &c, ReadOptions::default()).await?;
    assert!(matches!(
        src.configmaps.get("cfg"),
        Some(Source::Found { .. })
    ));
    assert_eq!(src.configmaps.get("gone"), Some(&Source::Missing));
    assert!(
        matches!(src.secrets.get("sec"), Some(Source::Found { data, .. }) if data.get("S").map(Vec::as_slice) == Some(b"x".as_slice()))
    );
    assert_eq!(
        src.master.as_ref().and_then(|s| s.metadata.name.as_deref()),
        Some("kubernetes")
    );

    // A user who may read everything but Secrets (what `view` gives).
    let viewer = server.kubeconfig_for("viewer", &[])?;
    let rbac = |kind: &str, body: serde_json::Value| {
        let api: Api<kube::api::DynamicObject> = Api::all_with(
            admin.client.clone(),
            &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                "rbac.authorization.k8s.io",
                "v1",
                kind,
            )),
        );
        async move {
            api.create(&PostParams::default(), &serde_json::from_value(body)?)
                .await
                .map(drop)
                .map_err(anyhow::Error::from)
        }
    };
    rbac(
        "ClusterRole",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "no-secrets"},
            "rules": [{"apiGroups": ["", "apps"], "resources": ["configmaps", "services", "pods", "deployments"], "verbs": ["get", "list"]}]}),
    )
    .await?;
    rbac(
        "ClusterRoleBinding",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "no-secrets"},
            "subjects": [{"kind": "User", "name": "viewer"}]}),
    )
    .await?;
    let viewer = target(&viewer).resolve().await?;
    let w = workload::find(&viewer, "default", &wref).await?;
    let src = workload::read_sources(&viewer, &w, &c, ReadOptions::default()).await?;
    assert_eq!(src.secrets.get("sec"), Some(&Source::Forbidden));
    let src = workload::read_sources(&viewer, &w, &c, ReadOptions { skip_secrets: true }).await?;
    assert_eq!(src.secrets.get("sec"), Some(&Source::Skipped));

    let missing = workload::find(
        &admin,
        "default",
        &"pod/nope".parse().map_err(anyhow::Error::msg)?,
    )
    .await
    .expect_err("no such pod");
    assert_eq!(missing.reason, "Pod nope not found in namespace default");
    Ok(())
}
