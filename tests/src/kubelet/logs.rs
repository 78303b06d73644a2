//! Container output as a runtime keeps it (a raw log and CRI log files per
//! instance) and the log endpoint behind the API server's `pods/{name}/log`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use minicluster_apiserver::logs::{LogOptions, LogSource, LogStream};
use minicluster_apiserver::resources::must;
use minicluster_apiserver::{ApiError, Store};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::ctx::ClusterCtx;

use super::{PODS, pod_dir};

/// The CRI logs of a container: `<state_dir>/pods/<ns>_<pod>/logs/<container>/`,
/// one `<n>.log` per instance (`n` counts starts from 0), as a kubelet keeps
/// `/var/log/pods/<ns>_<pod>_<uid>/<container>/<restart>.log`.
pub fn cri_log_dir(ctx: &ClusterCtx, ns: &str, pod: &str, container: &str) -> PathBuf {
    pod_dir(ctx, ns, pod).join("logs").join(container)
}

/// A CRI entry is cut into partial (`P`) entries beyond this many bytes.
const CRI_MAX_LINE: usize = 16 * 1024;

/// One CRI log line.
fn cri_line(stream: &str, partial: bool, content: &[u8]) -> Vec<u8> {
    let ts = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    let mut out = Vec::with_capacity(content.len() + ts.len() + 12);
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
    out
}

/// Appends `data` of `stream` to `pending` and returns the CRI lines that
/// are complete (and partial ones for overlong lines).
fn cri_lines(stream: &str, pending: &mut Vec<u8>, data: &[u8]) -> Vec<u8> {
    pending.extend_from_slice(data);
    let mut out = Vec::new();
    while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
        out.extend(cri_line(stream, false, &pending[..pos]));
        pending.drain(..=pos);
    }
    while pending.len() >= CRI_MAX_LINE {
        out.extend(cri_line(stream, true, &pending[..CRI_MAX_LINE]));
        pending.drain(..CRI_MAX_LINE);
    }
    out
}

async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    r: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Copies a container's stdout and stderr, as the runtime's shim does, to
/// its raw log (`<container>.log`: every instance's bytes as written, for
/// people and tests) and its CRI log (`logs/<container>/<n>.log`:
/// `<RFC 3339 time> <stream> <F|P> <line>`, what `kubectl logs` reads).
/// Writes `done` once both streams are closed.
pub(super) async fn copy_logs(
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    mut raw: fs::File,
    mut cri: fs::File,
    done: PathBuf,
) {
    use std::io::Write;
    let (mut out, mut err) = (Some(stdout), Some(stderr));
    let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
    let mut pending = [Vec::new(), Vec::new()];
    const STREAMS: [&str; 2] = ["stdout", "stderr"];
    while out.is_some() || err.is_some() {
        let (i, r) = tokio::select! {
            r = read_some(&mut out, &mut out_buf) => (0, r),
            r = read_some(&mut err, &mut err_buf) => (1, r),
        };
        match r {
            Ok(n) if n > 0 => {
                let data = if i == 0 { &out_buf[..n] } else { &err_buf[..n] };
                let lines = cri_lines(STREAMS[i], &mut pending[i], data);
                let _ = cri.write_all(&lines);
                let _ = raw.write_all(data);
            }
            _ => {
                if i == 0 {
                    out = None;
                } else {
                    err = None;
                }
                if !pending[i].is_empty() {
                    let _ = cri.write_all(&cri_line(STREAMS[i], false, &pending[i]));
                    pending[i].clear();
                }
            }
        }
    }
    let _ = fs::write(done, "");
}

/// One entry of a CRI log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CriEntry {
    /// As written (RFC 3339 with nanoseconds).
    ts: String,
    time: Option<SystemTime>,
    stream: String,
    partial: bool,
    content: Vec<u8>,
}

fn parse_cri_line(line: &[u8]) -> Option<CriEntry> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let ts = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let stream = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let tag = parts.next()?;
    let content = parts.next().unwrap_or_default().to_vec();
    Some(CriEntry {
        time: humantime::parse_rfc3339(&ts).ok(),
        ts,
        stream,
        partial: tag == b"P",
        content,
    })
}

/// Reads a CRI log as it grows: only complete lines come out.
struct CriReader {
    file: tokio::fs::File,
    rest: Vec<u8>,
}

impl CriReader {
    async fn next_entries(&mut self) -> std::io::Result<Vec<CriEntry>> {
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf).await?;
        self.rest.extend_from_slice(&buf);
        let Some(end) = self.rest.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.rest.drain(..=end).collect();
        Ok(complete
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(parse_cri_line)
            .collect())
    }
}

/// What `kubectl logs` prints for `entries`: `since` and `tail_lines`
/// applied (tail counts whole lines), each entry's content with its
/// newline, prefixed by its time with `timestamps`.
fn render_log(entries: &[CriEntry], opts: &LogOptions) -> Vec<u8> {
    let kept: Vec<&CriEntry> = entries
        .iter()
        .filter(|e| opts.since.is_none_or(|s| e.time.is_none_or(|t| t >= s)))
        .collect();
    let start = match opts.tail_lines {
        None => 0,
        Some(n) => {
            // Index of the first entry of the last `n` whole lines.
            let mut lines = 0u64;
            let mut start = kept.len();
            for (i, e) in kept.iter().enumerate().rev() {
                if !e.partial {
                    if lines == n {
                        break;
                    }
                    lines += 1;
                }
                start = i;
            }
            if n == 0 { kept.len() } else { start }
        }
    };
    render_entries(&kept[start..], opts.timestamps)
}

fn render_entries(entries: &[&CriEntry], timestamps: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if timestamps {
            out.extend_from_slice(e.ts.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&e.content);
        if !e.partial {
            out.push(b'\n');
        }
    }
    out
}

/// Which instance's log a request means, from the container's status (as
/// the kubelet's `validateContainerLogStatus`): the latest instance, or
/// the one before it with `previous`; else the kubelet's refusal.
fn log_instance(
    status: &Value,
    pod: &str,
    container: &str,
    previous: bool,
    latest: Option<u32>,
) -> Result<u32, String> {
    let state = &status["state"];
    let last = &status["lastState"];
    let waiting = state["waiting"].is_object();
    let not_found =
        || format!("previous terminated container \"{container}\" in pod \"{pod}\" not found");
    if previous {
        if !last["terminated"].is_object() {
            return Err(not_found());
        }
        let latest = latest.ok_or_else(not_found)?;
        // While a restart waits, the latest instance is the terminated one.
        return if waiting {
            Ok(latest)
        } else {
            latest.checked_sub(1).ok_or_else(not_found)
        };
    }
    let ok = state["running"].is_object()
        || state["terminated"].is_object()
        || last["terminated"].is_object();
    if ok && let Some(n) = latest {
        return Ok(n);
    }
    if let Some(reason) = state["waiting"]["reason"].as_str() {
        let why = match reason {
            "ErrImagePull" => "image can't be pulled".to_string(),
            "ImagePullBackOff" => "trying and failing to pull image".to_string(),
            r => r.to_string(),
        };
        return Err(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start: {why}"
        ));
    }
    Err(format!(
        "container \"{container}\" in pod \"{pod}\" is waiting to start - no logs yet"
    ))
}

/// The highest `<n>.log` in `dir`.
pub(super) fn latest_instance(dir: &Path) -> Option<u32> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse::<u32>()
                .ok()
        })
        .max()
}

/// How often a follow looks for more.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The kubelet's log endpoint for the API server's `pods/{name}/log`:
/// reads the container's CRI log; with `follow`, keeps sending what is
/// appended until the instance's output is closed, a newer instance
/// starts, the pod goes, or the client does.
pub fn log_source(store: Arc<Store>, ctx: ClusterCtx) -> LogSource {
    Arc::new(move |pod: Value, opts: LogOptions| {
        let (store, ctx) = (store.clone(), ctx.clone());
        Box::pin(async move { serve_log(store, ctx, pod, opts).await })
    })
}

async fn serve_log(
    store: Arc<Store>,
    ctx: ClusterCtx,
    pod: Value,
    opts: LogOptions,
) -> Result<LogStream, ApiError> {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let container = opts.container.clone();
    let status = ["containerStatuses", "initContainerStatuses"]
        .iter()
        .flat_map(|k| pod["status"][k].as_array().into_iter().flatten())
        .find(|s| s["name"].as_str() == Some(container.as_str()))
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "container \"{container}\" in pod \"{name}\" is not available"
            ))
        })?;
    let dir = cri_log_dir(&ctx, &ns, &name, &container);
    let latest = latest_instance(&dir);
    let n = log_instance(&status, &name, &container, opts.previous, latest)
        .map_err(ApiError::bad_request)?;
    let path = dir.join(format!("{n}.log"));
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\": reading its log: {e}"
        ))
    })?;
    let mut reader = CriReader {
        file,
        rest: Vec::new(),
    };
    let first = reader.next_entries().await.map_err(|e| {
        ApiError::new(
            500,
            "InternalError",
            format!("reading {}: {e}", path.display()),
        )
    })?;
    let head = render_log(&first, &opts);
    let follow = opts.follow && Some(n) == latest;
    if !follow {
        return Ok(futures::stream::iter([Bytes::from(head)]).boxed());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if !head.is_empty() && tx.send(Bytes::from(head)).await.is_err() {
            return;
        }
        let done = dir.join(format!("{n}.done"));
        let newer = dir.join(format!("{}.log", n + 1));
        let pods = must(PODS);
        loop {
            // Decide before reading, so whatever came before the end is sent.
            let ended = done.exists()
                || newer.exists()
                || store
                    .get(pods, &ns, &name)
                    .map(|p| p["metadata"]["uid"].as_str() != Some(uid.as_str()))
                    .unwrap_or(true);
            let entries = match reader.next_entries().await {
                Ok(e) => e,
                Err(_) => return,
            };
            let kept: Vec<&CriEntry> = entries
                .iter()
                .filter(|e| opts.since.is_none_or(|s| e.time.is_none_or(|t| t >= s)))
                .collect();
            let chunk = render_entries(&kept, opts.timestamps);
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            if ended {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    });
    Ok(
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
            .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use serde_json::json;

    use crate::ctx::NODE_NAME;

    fn entry(ts: &str, stream: &str, partial: bool, content: &str) -> CriEntry {
        CriEntry {
            ts: ts.to_string(),
            time: humantime::parse_rfc3339(ts).ok(),
            stream: stream.to_string(),
            partial,
            content: content.as_bytes().to_vec(),
        }
    }

    #[test]
    fn cri_logs_are_written_and_served() {
        let mut pending = Vec::new();
        let out = cri_lines("stdout", &mut pending, b"one\ntwo\nthr");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first = parse_cri_line(lines[0].as_bytes()).expect("parse");
        assert_eq!((first.stream.as_str(), first.partial), ("stdout", false));
        assert_eq!(first.content, b"one");
        assert!(first.time.is_some(), "{}", lines[0]);
        assert_eq!(pending, b"thr");
        let long = vec![b'x'; CRI_MAX_LINE + 10];
        let out = cri_lines("stderr", &mut pending, &long);
        let e = parse_cri_line(out.strip_suffix(b"\n").expect("newline")).expect("parse");
        assert!(e.partial && e.content.len() == CRI_MAX_LINE);
        assert_eq!(pending.len(), 13);
        assert_eq!(
            parse_cri_line(b"2024-01-01T00:00:00.5Z stdout F ")
                .expect("empty")
                .content,
            b""
        );

        let entries = vec![
            entry("2024-01-01T00:00:01.000000001Z", "stdout", false, "a"),
            entry("2024-01-01T00:00:02.000000001Z", "stderr", true, "b1-"),
            entry("2024-01-01T00:00:02.500000001Z", "stderr", false, "b2"),
            entry("2024-01-01T00:00:03.000000001Z", "stdout", false, "c"),
        ];
        let opts = |f: &dyn Fn(&mut LogOptions)| {
            let mut o = LogOptions::default();
            f(&mut o);
            o
        };
        assert_eq!(render_log(&entries, &opts(&|_| {})), b"a\nb1-b2\nc\n");
        assert_eq!(
            render_log(&entries, &opts(&|o| o.tail_lines = Some(2))),
            b"b1-b2\nc\n"
        );
        assert_eq!(
            render_log(&entries, &opts(&|o| o.tail_lines = Some(0))),
            b""
        );
        assert_eq!(
            render_log(&entries, &opts(&|o| o.tail_lines = Some(9))),
            b"a\nb1-b2\nc\n"
        );
        let since = humantime::parse_rfc3339("2024-01-01T00:00:02.2Z").expect("time");
        assert_eq!(
            render_log(&entries, &opts(&|o| o.since = Some(since))),
            b"b2\nc\n"
        );
        assert_eq!(
            render_log(&entries[3..], &opts(&|o| o.timestamps = true)),
            b"2024-01-01T00:00:03.000000001Z c\n"
        );
    }

    #[test]
    fn log_instances_follow_the_container_status() {
        let running = json!({"state": {"running": {}}, "lastState": {}});
        assert_eq!(log_instance(&running, "p", "c", false, Some(0)), Ok(0));
        assert_eq!(
            log_instance(&running, "p", "c", true, Some(0)),
            Err("previous terminated container \"c\" in pod \"p\" not found".to_string())
        );
        let restarted =
            json!({"state": {"running": {}}, "lastState": {"terminated": {"exitCode": 3}}});
        assert_eq!(log_instance(&restarted, "p", "c", false, Some(2)), Ok(2));
        assert_eq!(log_instance(&restarted, "p", "c", true, Some(2)), Ok(1));
        let backoff = json!({"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": {"exitCode": 3}}});
        assert_eq!(log_instance(&backoff, "p", "c", false, Some(2)), Ok(2));
        assert_eq!(log_instance(&backoff, "p", "c", true, Some(2)), Ok(2));
        let pulling = json!({"state": {"waiting": {"reason": "ErrImagePull"}}, "lastState": {}});
        assert_eq!(
            log_instance(&pulling, "bad", "x", false, None),
            Err(
                "container \"x\" in pod \"bad\" is waiting to start: image can't be pulled"
                    .to_string()
            )
        );
        let creating = json!({"state": {"waiting": {"reason": "ContainerCreating"}}});
        assert_eq!(
            log_instance(&creating, "p", "c", false, None),
            Err("container \"c\" in pod \"p\" is waiting to start: ContainerCreating".to_string())
        );
    }

    /// A follow ends when a newer instance starts, and its task goes when
    /// the client does.
    #[tokio::test]
    async fn follows_end_with_the_instance_or_the_client() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ctx = ClusterCtx {
            name: "unit".into(),
            state_dir: tmp.path().to_path_buf(),
            bin_dir: tmp.path().to_path_buf(),
            ca_pem: String::new(),
            issue_token: Arc::new(|_, _| String::new()),
        };
        let store = Arc::new(Store::new());
        store
            .create(
                must("core/v1/namespaces"),
                "",
                json!({"metadata": {"name": "default"}}),
            )
            .expect("ns");
        let pod = store
            .create(
                must(PODS),
                "default",
                json!({"metadata": {"name": "p"}, "spec": {"nodeName": NODE_NAME, "containers": [{"name": "c", "image": "x"}]},
                       "status": {"containerStatuses": [{"name": "c", "state": {"running": {}}, "lastState": {}}]}}),
            )
            .expect("pod");
        let dir = cri_log_dir(&ctx, "default", "p", "c");
        fs::create_dir_all(&dir).expect("log dir");
        fs::write(dir.join("0.log"), cri_line("stdout", false, b"first")).expect("log");
        let source = log_source(store.clone(), ctx.clone());
        let opts = LogOptions {
            container: "c".into(),
            follow: true,
            ..LogOptions::default()
        };
        let mut stream = source(pod.clone(), opts.clone()).await.expect("stream");
        assert_eq!(
            stream.next().await.expect("head"),
            Bytes::from_static(b"first\n")
        );
        let mut log = fs::OpenOptions::new()
            .append(true)
            .open(dir.join("0.log"))
            .expect("open");
        std::io::Write::write_all(&mut log, &cri_line("stderr", false, b"second")).expect("append");
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert_eq!(
            next.expect("in time").expect("more"),
            Bytes::from_static(b"second\n")
        );
        fs::write(dir.join("1.log"), "").expect("newer instance");
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert_eq!(end.expect("ends in time"), None);

        // A client that goes away: the follow's task lets go of the store.
        fs::remove_file(dir.join("1.log")).expect("rm");
        let stream = source(pod, opts).await.expect("stream");
        let held = Arc::strong_count(&store);
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&store) >= held {
            assert!(Instant::now() < deadline, "the follow outlived its client");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
