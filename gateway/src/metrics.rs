//! Prometheus text exposition at `GET /metrics`.
//!
//! The numbers live in the data path task (the single owner of the state);
//! each scrape asks it for a rendering over a channel, so a scrape always
//! sees current values and the hot path keeps plain counters, no atomics.
//! The HTTP side is a few lines over a TCP listener: one request per
//! connection, no keep-alive, nothing else served.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::datapath::Control;

/// Builder of the text format, version 0.0.4.
#[derive(Default)]
pub struct Exposition {
    text: String,
    family: &'static str,
}

impl Exposition {
    pub fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self.family = name;
    }

    /// A sample of the current family; `labels` without braces, "" for none.
    pub fn sample(&mut self, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{} {value}", self.family);
        } else {
            let _ = writeln!(self.text, "{}{{{labels}}} {value}", self.family);
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// Serve scrapes until the data path goes away.
pub async fn serve(listener: TcpListener, control: mpsc::Sender<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if control.is_closed() {
            return;
        }
        let control = control.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, control)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, control: mpsc::Sender<Control>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, body) = if method != b"GET" {
        ("405 Method Not Allowed", String::from("only GET\n"))
    } else if path != b"/metrics" {
        ("404 Not Found", String::from("metrics are at /metrics\n"))
    } else {
        let (tx, rx) = oneshot::channel();
        if control.send(Control::Metrics(tx)).await.is_err() {
            ("503 Service Unavailable", String::from("shutting down\n"))
        } else {
            match rx.await {
                Ok(text) => ("200 OK", text),
                Err(_) => ("503 Service Unavailable", String::from("shutting down\n")),
            }
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
