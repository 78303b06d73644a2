//! `pods/{name}/log`: the API server's half of container logs. It parses and
//! validates the `PodLogOptions` query, resolves the container the way the
//! real registry does, and asks the node (a [`LogSource`] it is given, as a
//! real API server asks the kubelet) for the stream; `limitBytes` is applied
//! here.
//!
//! Must never: read log files itself (the API server does not know where a
//! node keeps them).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde_json::{Value, json};

use crate::error::ApiError;

/// What a client asked of `GET .../pods/{name}/log`, validated, with the
/// container resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Always set (defaulted when the pod has one container).
    pub container: String,
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    /// Only lines written at or after this instant (`sinceSeconds` or
    /// `sinceTime`).
    pub since: Option<SystemTime>,
    pub limit_bytes: Option<u64>,
}

/// A container's log as it is read, chunk by chunk. A follow stream ends
/// when the container stops or the pod goes; dropping it tells the node the
/// client went away.
pub type LogStream = BoxStream<'static, Bytes>;

/// The node's log endpoint: (pod object, options) → the stream, or an error
/// such as `container "x" in pod "p" is waiting to start: ...` (400).
pub type LogSource =
    Arc<dyn Fn(Value, LogOptions) -> BoxFuture<'static, Result<LogStream, ApiError>> + Send + Sync>;

fn invalid(name: &str, causes: &[(&str, String)]) -> ApiError {
    let list: Vec<Value> = causes
        .iter()
        .map(|(field, message)| json!({"reason": "FieldValueInvalid", "message": message, "field": field}))
        .collect();
    let joined: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
    let joined = match joined.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    ApiError {
        details: Some(json!({"name": name, "kind": "PodLogOptions", "causes": list})),
        ..ApiError::new(
            422,
            "Invalid",
            format!("PodLogOptions \"{name}\" is invalid: {joined}"),
        )
    }
}

fn int(q: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<i64>, ApiError> {
    match q(key) {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse::<i64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "strconv.ParseInt: parsing {s:?}: invalid syntax (query parameter {key})"
            ))
        }),
    }
}

/// Parses and validates the query of a log request for `pod` (its
/// `metadata.name`, `spec.containers`, `spec.nodeName`), as the registry's
/// `LogLocation` does: defaulting the container of a one-container pod,
/// refusing an unknown one, and a pod without a node.
pub fn parse_options(
    pod: &Value,
    q: &dyn Fn(&str) -> Option<String>,
) -> Result<LogOptions, ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let flag = |k: &str| matches!(q(k).as_deref(), Some("true" | "1" | "True"));
    let tail = int(q, "tailLines")?;
    let since_seconds = int(q, "sinceSeconds")?;
    let limit = int(q, "limitBytes")?;
    let since_time =
        match q("sinceTime").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(humantime::parse_rfc3339_weak(&s).map_err(|e| {
                ApiError::bad_request(format!("parsing time {s:?} (sinceTime): {e}"))
            })?),
        };
    let mut causes = Vec::new();
    if let Some(t) = tail
        && t < 0
    {
        causes.push((
            "tailLines",
            format!("Invalid value: {t}: must be greater than or equal to 0"),
        ));
    }
    if let Some(l) = limit
        && l < 1
    {
        causes.push((
            "limitBytes",
            format!("Invalid value: {l}: must be greater than 0"),
        ));
    }
    if since_seconds.is_some() && since_time.is_some() {
        causes.push((
            "",
            "at most one of `sinceTime` or `sinceSeconds` may be specified".to_string(),
        ));
    }
    if let Some(s) = since_seconds
        && s < 1
    {
        causes.push((
            "sinceSeconds",
            format!("Invalid value: {s}: must be greater than 0"),
        ));
    }
    if !causes.is_empty() {
        return Err(invalid(name, &causes));
    }
    let names: Vec<&str> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str())
        .collect();
    let main: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match q("container").filter(|c| !c.is_empty()) {
        Some(c) if names.contains(&c.as_str()) => c,
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None => match main.as_slice() {
            [one] => one.to_string(),
            [] => {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}"
                )));
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    names.join(" ")
                )));
            }
        },
    };
    if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let since = since_time.or_else(|| {
        since_seconds.map(|s| {
            SystemTime::now()
                .checked_sub(std::time::Duration::from_secs(s as u64))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
    });
    Ok(LogOptions {
        container,
        follow: flag("follow"),
        previous: flag("previous"),
        timestamps: flag("timestamps"),
        tail_lines: tail.map(|t| t as u64),
        since,
        limit_bytes: limit.map(|l| l as u64),
    })
}

/// Cuts the stream after `limit` bytes.
pub fn limit_bytes(stream: LogStream, limit: Option<u64>) -> LogStream {
    let Some(limit) = limit else { return stream };
    futures::stream::unfold((stream, limit), |(mut s, left)| async move {
        if left == 0 {
            return None;
        }
        let chunk = s.next().await?;
        let chunk = if chunk.len() as u64 > left {
            chunk.slice(..left as usize)
        } else {
            chunk
        };
        let left = left - chunk.len() as u64;
        Some((chunk, (s, left)))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: &[&str]) -> Value {
        let cs: Vec<Value> = containers
            .iter()
            .map(|c| json!({"name": c, "image": "x"}))
            .collect();
        json!({"metadata": {"name": "p"}, "spec": {"nodeName": "node-1", "containers": cs}})
    }

    fn query(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn containers_are_resolved_like_the_registry() {
        let o = parse_options(&pod(&["a"]), &query(&[("follow", "true")])).expect("one");
        assert_eq!(o.container, "a");
        assert!(o.follow && !o.previous);
        let e = parse_options(&pod(&["a", "b"]), &query(&[])).expect_err("two");
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b]"
        );
        let e = parse_options(&pod(&["a"]), &query(&[("container", "z")])).expect_err("z");
        assert_eq!(e.message, "container z is not valid for pod p");
        let mut unscheduled = pod(&["a"]);
        unscheduled["spec"]["nodeName"] = Value::Null;
        let e = parse_options(&unscheduled, &query(&[])).expect_err("no node");
        assert_eq!(e.message, "pod p does not have a host assigned");
    }

    #[test]
    fn options_are_validated() {
        let o = parse_options(
            &pod(&["a"]),
            &query(&[
                ("tailLines", "3"),
                ("sinceSeconds", "60"),
                ("timestamps", "true"),
                ("limitBytes", "10"),
            ]),
        )
        .expect("valid");
        assert_eq!(o.tail_lines, Some(3));
        assert_eq!(o.limit_bytes, Some(10));
        assert!(o.timestamps);
        let since = o.since.expect("since");
        let age = SystemTime::now().duration_since(since).expect("past");
        assert!(age.as_secs() >= 59 && age.as_secs() <= 61, "{age:?}");
        let e = parse_options(&pod(&["a"]), &query(&[("tailLines", "-1")])).expect_err("neg");
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "PodLogOptions \"p\" is invalid: tailLines: Invalid value: -1: must be greater than or equal to 0"
        );
        let e = parse_options(
            &pod(&["a"]),
            &query(&[("sinceSeconds", "5"), ("sinceTime", "2024-01-01T00:00:00Z")]),
        )
        .expect_err("both");
        assert!(e.message.contains("at most one of"), "{}", e.message);
        let e = parse_options(&pod(&["a"]), &query(&[("tailLines", "x")])).expect_err("nan");
        assert_eq!(e.code, 400);
    }

    #[tokio::test]
    async fn limit_bytes_cuts_the_stream() {
        let s: LogStream = futures::stream::iter(vec![
            Bytes::from_static(b"hello "),
            Bytes::from_static(b"world\n"),
            Bytes::from_static(b"more\n"),
        ])
        .boxed();
        let out: Vec<Bytes> = limit_bytes(s, Some(8)).collect().await;
        assert_eq!(out.concat(), b"hello wo");
    }
}
