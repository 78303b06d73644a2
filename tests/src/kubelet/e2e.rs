//! Root-only: a node, a laptop, kubelet + kube-proxy + DNS on a bare store,
//! real nginx and busybox-style pods, traffic through ClusterIPs and names.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use minicluster_apiserver::Store;
use minicluster_apiserver::resources::must;
use serde_json::{Value, json};

use super::logs::{cri_log_dir, latest_instance};
use super::{PODS, log_path, pod_dir, pod_netns_name, run};
use crate::ctx::NODE_NAME;
use crate::net;
use crate::net::root_or_skip;
use crate::net::tests::{Guard, test_ctx};
use crate::net::{create_laptop, create_node, netns_exec};

fn create(store: &Store, key: &str, ns: &str, obj: Value) -> Value {
    store.create(must(key), ns, obj).expect("create")
}

async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ready_ip(store: &Store, ns: &str, name: &str) -> Option<String> {
    let p = store.get(must(PODS), ns, name).ok()?;
    let ready = p["status"]["conditions"]
        .as_array()?
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ready
        .then(|| p["status"]["podIP"].as_str().map(str::to_string))
        .flatten()
}

#[test]
fn pods_services_dns_and_laptop_isolation() {
    if !root_or_skip("pods_services_dns_and_laptop_isolation") {
        return;
    }
    let ctx = test_ctx("k");
    let _guard = Guard(ctx.name.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        create_node(&ctx).expect("node");
        let laptop = create_laptop(&ctx, 1).expect("laptop");
        crate::dns::start_corp_dns(&ctx).expect("corp dns");
        let store = Arc::new(Store::new());
        for ns in ["default", "kube-system"] {
            create(&store, "core/v1/namespaces", "", json!({"metadata": {"name": ns}}));
        }
        tokio::spawn(run(store.clone(), ctx.clone()));
        tokio::spawn(crate::proxy::run(store.clone(), ctx.clone()));
        tokio::spawn(crate::dns::run(store.clone(), ctx.clone()));
        create(&store, "core/v1/services", "kube-system", json!({"metadata": {"name": "kube-dns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}));
        // kube-dns's endpoints at the cluster DNS's first instance; the
        // mirroring controller makes its slice (and follows the DNS's
        // rolling replacements).
        let dns_port = crate::dns::FIRST_PORT;
        create(&store, "core/v1/endpoints", "kube-system", json!({"metadata": {"name": "kube-dns"},
            "subsets": [{"addresses": [{"ip": "10.244.0.1"}], "ports": [
                {"name": "dns", "port": dns_port, "protocol": "UDP"}, {"name": "dns-tcp", "port": dns_port, "protocol": "TCP"}]}]}));
        tokio::spawn(crate::informer::run(
            store.clone(),
            crate::endpoints::MirrorController::default(),
            crate::informer::Lag::NONE,
        ));
        create(&store, "core/v1/services", "default", json!({"metadata": {"name": "kubernetes"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}}));
        create(&store, "core/v1/services", "default", json!({"metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.20", "type": "NodePort",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]}}));
        create(&store, "core/v1/configmaps", "default", json!({"metadata": {"name": "cfg"}, "data": {"GREETING": "hi", "conf.txt": "file-from-cm"}}));
        let t0 = Instant::now();
        create(&store, "core/v1/pods", "default", json!({"metadata": {"name": "web-1"},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "nginx", "image": "nginx:1.25",
                "ports": [{"name": "http", "containerPort": 80}]}]}}));
        create(&store, "core/v1/pods", "default", json!({"metadata": {"name": "caller"},
            "spec": {"nodeName": NODE_NAME,
                "securityContext": {"runAsUser": 65534},
                "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                "containers": [{"name": "sh", "image": "busybox",
                    "command": ["sleep", "infinity"],
                    "envFrom": [{"configMapRef": {"name": "cfg"}}],
                    "volumeMounts": [{"name": "cfg", "mountPath": "/run/cfg"}],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true}}]}}));
        create(&store, "core/v1/pods", "default", json!({"metadata": {"name": "bad"},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "x", "image": "quay.io/nope/nope"}]}}));
        let web_ip = wait_for("web-1 ready", 20, || ready_ip(&store, "default", "web-1")).await;
        eprintln!("web-1 ready after {:?} (includes creating the 100 MiB file)", t0.elapsed());
        let t1 = Instant::now();
        let caller_ip = wait_for("caller ready", 10, || ready_ip(&store, "default", "caller")).await;
        eprintln!("caller ready {:?} later", t1.elapsed());
        let bad = wait_for("bad pod status", 10, || {
            let p = store.get(must(PODS), "default", "bad").ok()?;
            (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull").then_some(p)
        })
        .await;
        assert_eq!(bad["status"]["phase"], "Pending");

        // Endpoints, as the endpoints controller would write them.
        create(&store, "discovery.k8s.io/v1/endpointslices", "default", json!({
            "metadata": {"name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [web_ip], "conditions": {"ready": true}}]}));

        let node = ctx.node_netns();
        let caller_ns = pod_netns_name(&ctx.name, store.get(must(PODS), "default", "caller").expect("caller")["metadata"]["uid"].as_str().unwrap_or(""));
        let curl = |ns: &str, url: &str| netns_exec(ns, "curl", &["-sS", "--max-time", "3", url]);
        // Pod IP from the node, ClusterIP from the node.
        assert!(curl(&node, &format!("http://{web_ip}/index.html")).expect("pod ip").contains("nginx"));
        let sums = fs::read_to_string(ctx.state_dir.join("www/SHA256SUMS")).expect("sums");
        let got = wait_for("ClusterIP DNAT", 5, || {
            netns_exec(&node, "curl", &["-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{size_download}", "http://10.96.0.20/1k.bin"]).ok()
        })
        .await;
        assert_eq!(got, "1024");
        // From a pod, by name (cluster DNS through 10.96.0.10, search
        // list, hairpin DNAT on the shared bridge).
        let page = wait_for("web by name", 5, || curl(&caller_ns, "http://web/index.html").ok()).await;
        assert!(page.contains("nginx"), "{page}");
        let big = netns_exec(&caller_ns, "sh", &["-c", "curl -sS --max-time 20 http://web.default.svc.cluster.local/100m.bin | sha256sum"]).expect("big");
        let want = sums.lines().find(|l| l.ends_with("100m.bin")).and_then(|l| l.split_whitespace().next()).unwrap_or("?");
        assert!(big.starts_with(want), "{big} vs {want}");
        // Records follow the controllers (informer lag, then a DNS
        // instance swap): wait for them, as a client retrying would.
        let want_srv = "0 100 80 web.default.svc.cluster.local.";
        wait_for("the SRV record", 10, || {
            let srv = netns_exec(&caller_ns, "dig", &["+short", "SRV", "_http._tcp.web.default.svc.cluster.local"]).ok()?;
            (srv.trim() == want_srv).then_some(())
        })
        .await;
        let dashed = caller_ip.replace('.', "-");
        wait_for("the pod's A record", 10, || {
            let a = netns_exec(&caller_ns, "dig", &["+short", &format!("{dashed}.default.pod.cluster.local")]).ok()?;
            (a.trim() == caller_ip).then_some(())
        })
        .await;
        let nx = netns_exec(&caller_ns, "dig", &["nope.default.svc.cluster.local"]).expect("dig");
        assert!(nx.contains("NXDOMAIN"), "{nx}");
        let tcp = netns_exec(&caller_ns, "dig", &["+tcp", "+short", "kubernetes.default.svc.cluster.local"]).expect("dig tcp");
        assert_eq!(tcp.trim(), "10.96.0.1");
        assert!(crate::dns::probe(&ctx));

        // The caller's process: user, capabilities, mounts, env, hostname.
        let pid = store.get(must(PODS), "default", "caller").expect("caller")["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|s| s.strip_prefix("mc://"))
            .and_then(|s| s.parse::<u32>().ok())
            .expect("pid");
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        assert!(status.lines().any(|l| l.starts_with("CapEff:") && l.ends_with("0000000000000000")), "{status}");
        assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")));
        assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')));
        let root = format!("/proc/{pid}/root");
        assert_eq!(fs::read_to_string(format!("{root}/run/secrets/kubernetes.io/serviceaccount/token")).expect("token"), "token-default-default");
        assert_eq!(fs::read_to_string(format!("{root}/run/cfg/conf.txt")).expect("cm file"), "file-from-cm");
        assert!(fs::read_to_string(format!("{root}/etc/resolv.conf")).expect("resolv").contains("ndots:5"));
        let environ = fs::read(format!("/proc/{pid}/environ")).expect("environ");
        assert!(String::from_utf8_lossy(&environ).contains("GREETING=hi"));
        let mounts = fs::read_to_string(format!("/proc/{pid}/mounts")).expect("mounts");
        assert!(mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/") && l.contains(" ro,")), "{mounts}");

        // NodePort from the laptop works, nothing else of the cluster.
        assert!(curl(&laptop, "http://192.168.240.1:30080/index.html").expect("nodeport").contains("nginx"));
        assert!(curl(&laptop, "http://10.96.0.20/").is_err());
        assert!(curl(&laptop, &format!("http://{web_ip}/")).is_err());
        let corp = netns_exec(&laptop, "dig", &["+short", "intranet.example"]).expect("corp dig");
        assert_eq!(corp.trim(), "192.168.240.80");

        // No endpoints → refused at once.
        store.delete(must("discovery.k8s.io/v1/endpointslices"), "default", "web-x").expect("delete slice");
        // While the rules change a request may still time out; within
        // 5 s it must be refused at once (curl exit 7).
        let err = wait_for("REJECT", 5, || {
            curl(&node, "http://10.96.0.20/").err().filter(|e| format!("{e:#}").contains("curl: (7)"))
        })
        .await;
        assert!(format!("{err:#}").contains("curl: (7)"), "{err:#}");

        // Deleting a pod stops it and removes its namespace.
        let web_uid = store.get(must(PODS), "default", "web-1").expect("web")["metadata"]["uid"].as_str().unwrap_or("").to_string();
        store.delete(must(PODS), "default", "web-1").expect("delete");
        let web_ns = pod_netns_name(&ctx.name, &web_uid);
        let web_dir = pod_dir(&ctx, "default", "web-1");
        wait_for("web-1 gone", 10, || (!net::netns_exists(&web_ns) && !web_dir.exists()).then_some(())).await;
    });
    drop(rt);
}

#[test]
fn restarts_and_completion() {
    if !root_or_skip("restarts_and_completion") {
        return;
    }
    let ctx = test_ctx("r");
    let _guard = Guard(ctx.name.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        create_node(&ctx).expect("node");
        let store = Arc::new(Store::new());
        create(&store, "core/v1/namespaces", "", json!({"metadata": {"name": "default"}}));
        tokio::spawn(run(store.clone(), ctx.clone()));
        let pod = |name: &str, policy: &str, script: &str| {
            json!({"metadata": {"name": name}, "spec": {"nodeName": NODE_NAME, "restartPolicy": policy,
                "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", script]}]}})
        };
        create(&store, "core/v1/pods", "default", pod("crash", "Always", "echo out; exit 3"));
        create(&store, "core/v1/pods", "default", pod("ok", "Never", "exit 0"));
        create(&store, "core/v1/pods", "default", pod("fail", "Never", "exit 2"));
        let get = |name: &str| store.get(must(PODS), "default", name).expect("pod");
        let crash = wait_for("restarts", 10, || {
            let p = get("crash");
            (p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(2)).then_some(p)
        })
        .await;
        assert_eq!(crash["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 3);
        assert_eq!(crash["status"]["phase"], "Running");
        wait_for("Succeeded", 10, || (get("ok")["status"]["phase"] == "Succeeded").then_some(())).await;
        let f = wait_for("Failed", 10, || {
            let p = get("fail");
            (p["status"]["phase"] == "Failed").then_some(p)
        })
        .await;
        assert_eq!(f["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"], 2);
        // Output is copied from the containers' pipes as it comes: the
        // raw log has every instance's, the CRI logs one each.
        wait_for("two instances' output", 10, || {
            let log = fs::read_to_string(log_path(&ctx, "default", "crash", "c")).ok()?;
            log.starts_with("out\nout\n").then_some(())
        })
        .await;
        let dir = cri_log_dir(&ctx, "default", "crash", "c");
        // Two exits so far: instances 0 and 1 logged, a third may be
        // waiting out its back-off.
        let latest = latest_instance(&dir).expect("CRI logs");
        assert!(latest >= 1, "{latest}");
        let prev = fs::read_to_string(dir.join(format!("{}.log", latest - 1))).expect("previous");
        assert!(prev.ends_with(" stdout F out\n"), "{prev:?}");
        if let Some(older) = latest.checked_sub(2) {
            assert!(!dir.join(format!("{older}.log")).exists(), "older instances are collected");
        }
    });
    drop(rt);
}
