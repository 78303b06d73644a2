//! The `flows` workload: `mc-flows`' echo server (TCP and UDP) in a pod,
//! for the tests that load the data path.

use std::path::Path;

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
