//! The `flows` workload: `mc-flows`' echo server (TCP and UDP) in a pod,
//! for the tests that load the data path.

use std::path::Path;
use std::time::Duration;

use burrow_tests::cluster::Cluster;

use super::*;

/// The echo server's port (TCP and UDP).
pub const FLOWS_PORT: u16 = 7000;

/// The `flows` Deployment, running `mc_flows` (the test binary).
pub fn flows_yaml(mc_flows: &Path) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: flows
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {{app: flows}}
  template:
    metadata:
      labels: {{app: flows}}
    spec:
      containers:
      - name: echo
        image: debian:12
        command: ["{bin}", "echo-server", "--port", "{FLOWS_PORT}"]
        ports:
        - containerPort: {FLOWS_PORT}
        readinessProbe:
          tcpSocket:
            port: {FLOWS_PORT}
          periodSeconds: 1
"#,
        bin = mc_flows.display()
    )
}

/// The `flows` pod once Ready: its name and IP.
pub fn flows_pod_ready(c: &Cluster) -> (String, String) {
    eventually(Duration::from_secs(60), "the flows pod Ready", || {
        let o = run(kubectl(
            c,
            &[
                "get",
                "pods",
                "-l",
                "app=flows",
                "-o",
                "jsonpath={.items[0].metadata.name} {.items[0].status.podIP} {.items[0].status.conditions[?(@.type==\"Ready\")].status}",
            ],
        ));
        let out = stdout(&o);
        let mut fields = out.split_whitespace();
        let (name, ip, ready) = (fields.next()?, fields.next()?, fields.next()?);
        (ready == "True").then(|| (name.to_string(), ip.to_string()))
    })
}
