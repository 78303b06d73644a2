//! kube-rs 5 against the stand-in API server on loopback.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config};
use minicluster_apiserver::local::LocalServer;
use minicluster_apiserver::resources::must;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn client(server: &LocalServer, kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(
        cfg.cluster_url.to_string().trim_end_matches('/'),
        server.url
    );
    Client::try_from(cfg).expect("client")
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
) -> WatchEvent<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_list_watch_write_patch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = LocalServer::start(dir.path()).await.expect("server");
    let client = client(&server, &server.kubeconfig).await;

    let info = client.apiserver_version().await.expect("version");
    assert_eq!(info.git_version, "v1.32.0");

    let nss: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.contains(&"default".to_string()) && names.contains(&"kube-system".to_string()));

    // Watch from "now" (resourceVersion of a list) and see the changes in order.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let list = cms.list(&ListParams::default()).await.expect("list");
    let rv = list.metadata.resource_version.clone().expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .expect("watch")
        .boxed();

    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "w", "labels": {"a": "1"}}, "data": {"k": "v"}}),
    )
    .expect("cm");
    let created = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    assert!(created.metadata.uid.is_some());
    let err = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect_err("exists");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "AlreadyExists");
        }
        other => panic!("unexpected {other:?}"),
    }
    cms.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k2": "v2"}})),
    )
    .await
    .expect("merge patch");
    cms.delete("w", &DeleteParams::default())
        .await
        .expect("delete");
    match next_event(&mut stream).await {
        WatchEvent::Added(c) => assert_eq!(c.metadata.name.as_deref(), Some("w")),
        e => panic!("expected ADDED, got {e:?}"),
    }
    match next_event(&mut stream).await {
        WatchEvent::Modified(c) => assert_eq!(
            c.data.expect("data").get("k2").map(String::as_str),
            Some("v2")
        ),
        e => panic!("expected MODIFIED, got {e:?}"),
    }
    match next_event(&mut stream).await {
        WatchEvent::Deleted(c) => assert_eq!(c.metadata.name.as_deref(), Some("w")),
        e => panic!("expected DELETED, got {e:?}"),
    }

    // kube::runtime::watcher (list + watch, bookmarks) on services.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let mut w = watcher(svcs.clone(), watcher::Config::default().labels("app=echo")).boxed();
    let mut init_done = false;
    while !init_done {
        match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitDone))) => init_done = true,
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher init: {other:?}"),
        }
    }

    // Server-side apply creates, then updates.
    let ssa = PatchParams::apply("burrow-test").force();
    let applied = svcs
        .patch(
            "echo",
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "echo", "labels": {"app": "echo"}},
                "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            })),
        )
        .await
        .expect("apply create");
    let spec = applied.spec.clone().expect("spec");
    let ip = spec.cluster_ip.clone().expect("clusterIP");
    assert!(ip.starts_with("10."), "{ip}");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let mf = applied
        .metadata
        .managed_fields
        .clone()
        .expect("managedFields");
    assert_eq!(mf[0].manager.as_deref(), Some("burrow-test"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await {
        Ok(Ok(Some(watcher::Event::Apply(s)))) => {
            assert_eq!(s.metadata.name.as_deref(), Some("echo"))
        }
        other => panic!("watcher apply: {other:?}"),
    }
    let err = svcs
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service"})),
        )
        .await
        .expect_err("fieldManager required");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 400),
        "{err:?}"
    );

    // Strategic merge: ports merge by port; JSON patch; merge patch.
    let p = svcs
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"ports": [{"name": "metrics", "port": 9090}]}})),
        )
        .await
        .expect("strategic");
    assert_eq!(
        p.spec.as_ref().and_then(|s| s.ports.as_ref()).map(Vec::len),
        Some(2)
    );
    let p = svcs
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(
                    json!([{"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}]),
                )
                .expect("json patch"),
            ),
        )
        .await
        .expect("json patch");
    assert_eq!(
        p.metadata
            .annotations
            .expect("annotations")
            .get("x")
            .map(String::as_str),
        Some("y")
    );
    let p = svcs
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": {"app": "y"}}})),
        )
        .await
        .expect("merge");
    assert_eq!(
        p.spec.as_ref().and_then(|s| s.cluster_ip.clone()),
        Some(ip.clone())
    );
    let err = svcs
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"clusterIP": "10.96.99.99", "clusterIPs": ["10.96.99.99"]}}),
            ),
        )
        .await
        .expect_err("immutable");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.reason == "Invalid"),
        "{err:?}"
    );
    let err = svcs.get("missing").await.expect_err("404");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let err = svcs
        .patch("missing", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .expect_err("404");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    // Stale resourceVersion on replace: 409 Conflict.
    let mut stale = applied.clone();
    stale.metadata.managed_fields = None;
    let err = svcs
        .replace("echo", &PostParams::default(), &stale)
        .await
        .expect_err("conflict");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );

    svcs.delete("echo", &DeleteParams::default())
        .await
        .expect("delete svc");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), w.try_next()).await {
            Ok(Ok(Some(watcher::Event::Delete(s)))) => {
                assert_eq!(s.metadata.name.as_deref(), Some("echo"));
                break;
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher delete: {other:?}"),
        }
    }

    // Streaming lists (sendInitialEvents + the initial-events-end bookmark).
    let mut sw = watcher(nss.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sw.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitApply(n)))) => seen.extend(n.metadata.name),
            Ok(Ok(Some(watcher::Event::InitDone))) => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("streaming list: {other:?}"),
        }
    }
    assert!(seen.contains(&"kube-system".to_string()), "{seen:?}");

    // Resuming a watch from an older resourceVersion replays what followed.
    let cm2: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "r"}})).expect("cm");
    cms.create(&PostParams::default(), &cm2)
        .await
        .expect("create r");
    let mut replay = cms
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut types = Vec::new();
    for _ in 0..4 {
        types.push(match next_event(&mut replay).await {
            WatchEvent::Added(c) => format!("ADDED {}", c.metadata.name.unwrap_or_default()),
            WatchEvent::Modified(c) => format!("MODIFIED {}", c.metadata.name.unwrap_or_default()),
            WatchEvent::Deleted(c) => format!("DELETED {}", c.metadata.name.unwrap_or_default()),
            e => format!("{e:?}"),
        });
    }
    assert_eq!(types, ["ADDED w", "MODIFIED w", "DELETED w", "ADDED r"]);

    // A token-authenticated service account without rights is forbidden.
    let token = server.auth.issue_token("default", "nobody");
    let mut cfg = Config::new(server.url.parse().expect("url"));
    cfg.root_cert = Some(vec![
        rustls_pemfile::certs(&mut server.pki.ca_pem.as_bytes())
            .next()
            .expect("ca")
            .expect("ca pem")
            .to_vec(),
    ]);
    cfg.auth_info.token = Some(token.into());
    let sa_client = Client::try_from(cfg).expect("sa client");
    let err = Api::<Pod>::namespaced(sa_client, "default")
        .list(&ListParams::default())
        .await
        .expect_err("forbidden");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert_eq!(
                s.message,
                "pods is forbidden: User \"system:serviceaccount:default:nobody\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_portforward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = LocalServer::start(dir.path()).await.expect("server");
    let client = client(&server, &server.kubeconfig).await;

    // A TCP echo server on loopback stands in for the pod.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "echo"},
        "spec": {"containers": [{"name": "echo", "image": "echo", "ports": [{"containerPort": port}]}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    pods.patch_status(
        "echo",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}})),
    )
    .await
    .expect("status");
    let stored = server
        .store
        .get(must("core/v1/pods"), "default", "echo")
        .expect("stored");
    assert_eq!(stored["status"]["podIP"], "127.0.0.1");

    for round in 0..3 {
        let mut pf = pods
            .portforward("echo", &[port])
            .await
            .expect("portforward");
        let mut stream = pf.take_stream(port).expect("stream");
        let msg = format!("hello through the tunnel {round}");
        stream.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(buf, msg.as_bytes());
        drop(stream);
        let _ = tokio::time::timeout(Duration::from_secs(10), pf.join())
            .await
            .expect("join in time");
    }

    // A closed port: the error channel says so.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut pf = pods
        .portforward("echo", &[closed])
        .await
        .expect("portforward");
    let err = pf.take_error(closed).expect("error future");
    let msg = tokio::time::timeout(Duration::from_secs(10), err)
        .await
        .expect("error in time");
    assert!(
        msg.is_some_and(|m| m.contains("error forwarding port")),
        "no error message"
    );

    // Missing pod: 404.
    let err = pods.portforward("nope", &[80]).await.err().expect("404");
    assert!(format!("{err:?}").contains("404"), "{err:?}");

    // RBAC: a WebSocket port-forward needs `get` and `create` on
    // pods/portforward (`pods` is not enough); each 403 names the verb.
    let rbac = |kind: &str, name: &str, body: serde_json::Value| {
        let rt = must(&format!("rbac.authorization.k8s.io/v1/{kind}"));
        let mut body = body;
        body["metadata"] = json!({"name": name});
        minicluster_apiserver::admission::create(&server.store, rt, "default", body)
            .expect("rbac object");
    };
    let bind = |user: &str, role: &str| {
        json!({"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
    };
    for (role, verbs) in [
        ("pf-get", json!(["get"])),
        ("pf-create", json!(["create"])),
        ("pf-both", json!(["get", "create"])),
    ] {
        rbac(
            "roles",
            role,
            json!({"rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
                {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": verbs},
            ]}),
        );
        rbac("rolebindings", role, bind(role, role));
    }
    for (user, missing) in [
        ("pf-get", Some("create")),
        ("pf-create", Some("get")),
        ("pf-both", None),
    ] {
        let kc = server.kubeconfig_for(user, &[]).expect("kubeconfig");
        let theirs: Api<Pod> = Api::namespaced(client_for(&kc).await, "default");
        match (theirs.portforward("echo", &[port]).await, missing) {
            (Ok(mut pf), None) => {
                let _ = pf.take_stream(port).expect("stream");
            }
            (Err(e), Some(verb)) => {
                let text = format!("{e:?}");
                assert!(
                    text.contains("403")
                        && text
                            .contains(&format!("cannot {verb} resource \\\"pods/portforward\\\"")),
                    "{user}: {text}"
                );
            }
            (Ok(_), Some(verb)) => panic!("{user} port-forwarded without {verb}"),
            (Err(e), None) => panic!("{user}: {e:?}"),
        }
    }
}

async fn client_for(kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}
