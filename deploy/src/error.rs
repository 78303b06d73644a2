//! Errors of everything that talks to the Kubernetes API, each with the one
//! line a user needs: what failed, and what to do about it.

use std::fmt;

/// A failure talking to the cluster, already phrased for the user.
#[derive(Debug, thiserror::Error)]
pub struct DeployError {
    /// What failed, in one line.
    pub reason: String,
    /// What to do next (empty when there is nothing useful to say).
    pub hint: String,
    /// The HTTP status of the API server's answer, when there was one.
    pub code: Option<u16>,
}

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if !self.hint.is_empty() {
            write!(f, "\n  hint: {}", self.hint)?;
        }
        Ok(())
    }
}

impl DeployError {
    pub fn new(reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            hint: hint.into(),
            code: None,
        }
    }

    /// Whether the API server answered 404.
    pub fn is_not_found(&self) -> bool {
        self.code == Some(404)
    }

    /// Whether the API server answered 403.
    pub fn is_forbidden(&self) -> bool {
        self.code == Some(403)
    }

    /// Phrases a kube-rs error for the user. `doing` says what was being
    /// attempted, e.g. "create Deployment burrow-system/burrow-gateway";
    /// `server` is the API server's URL, for connection failures.
    pub fn from_kube(err: kube::Error, doing: &str, server: &str) -> Self {
        match err {
            kube::Error::Api(status) => {
                let code = status.code;
                let message = if status.message.is_empty() {
                    status.reason.clone()
                } else {
                    status.message.clone()
                };
                let hint = match code {
                    401 => "your credentials were refused: log in again (refresh the kubeconfig's token or certificate)".to_string(),
                    403 => format!(
                        "ask a cluster admin to grant your user the permission to {doing}, or use a context that has it (`--context`)"
                    ),
                    _ => String::new(),
                };
                Self {
                    reason: format!("cannot {doing}: {message} (HTTP {code})"),
                    hint,
                    code: Some(code),
                }
            }
            kube::Error::SerdeError(e) => Self {
                reason: format!(
                    "cannot {doing}: the API server at {server} sent an answer burrow does not understand: {e}"
                ),
                hint: "this is a bug in burrow or an unusual API server: please report it with `kubectl version`".to_string(),
                code: None,
            },
            other => {
                let text = error_chain(&other);
                let hint = if text.contains("certificate") || text.contains("tls") {
                    "the API server's certificate was not accepted: check the kubeconfig's certificate-authority-data for this cluster".to_string()
                } else {
                    format!(
                        "check that the API server at {server} is up and reachable from here (VPN? right context? try `kubectl --context ... get ns`)"
                    )
                };
                Self {
                    reason: format!("cannot {doing}: the API server at {server} did not answer: {text}"),
                    hint,
                    code: None,
                }
            }
        }
    }
}

/// An error and its sources on one line, without repeating a source whose
/// text the outer message already contains.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, message: &str) -> kube::Error {
        let mut s = kube::core::Status::failure(message, reason);
        s.code = code;
        kube::Error::Api(s.boxed())
    }

    #[test]
    fn forbidden_names_the_action_and_what_to_do() {
        let e = DeployError::from_kube(
            status(
                403,
                "Forbidden",
                "services \"echo\" is forbidden: User \"bob\" cannot patch resource \"services\"",
            ),
            "patch Service default/echo",
            "https://10.0.0.1:6443",
        );
        assert!(e.is_forbidden());
        let text = e.to_string();
        assert!(
            text.starts_with("cannot patch Service default/echo: services \"echo\" is forbidden")
        );
        assert!(text.contains("(HTTP 403)"));
        assert!(text.contains("hint: ask a cluster admin"));
    }

    #[test]
    fn not_found_is_detectable() {
        let e = DeployError::from_kube(
            status(404, "NotFound", "services \"nosuch\" not found"),
            "get Service default/nosuch",
            "https://x",
        );
        assert!(e.is_not_found());
        assert!(e.hint.is_empty());
    }
}
