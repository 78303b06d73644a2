//! `burrow env`: the environment a workload's container gets in the
//! cluster, computed as the kubelet computes it (`burrow_deploy::podenv`)
//! from the objects read with the user's credentials
//! (`burrow_deploy::workload`), printed as dotenv, JSON or shell. The
//! workload selection and its resolution are shared with `burrow run`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use burrow_deploy::podenv::{self, Inputs, Left, Leniency, Mount, Problem};
use burrow_deploy::workload::{self, ReadOptions, Workload, WorkloadRef};
use burrow_deploy::{Cluster, Target};
use clap::{Args, ValueEnum};

use crate::cli::connect::{ClusterArgs, daemon_conn, exchange};
use crate::protocol::{Request, Status};

/// Which workload and container, and how strict to be: shared by `env` and
/// `run`.
#[derive(Args, Debug, Clone)]
pub struct Selection {
    /// The workload: deploy/NAME, statefulset/NAME, daemonset/NAME,
    /// pod/NAME, or a bare NAME (a Deployment, else a pod).
    #[arg(value_name = "WORKLOAD")]
    pub workload: String,
    /// The container (default: the pod's first; init containers only by
    /// name).
    #[arg(short = 'c', long, value_name = "NAME")]
    pub container: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Leave out variables and files that come from Secrets (for users who
    /// may not read them, e.g. with the `view` role).
    #[arg(long)]
    pub skip_secrets: bool,
    /// When the workload has no running pod, leave out the variables only
    /// a pod has (its name, uid, IPs, node) instead of failing.
    #[arg(long)]
    pub allow_missing_pod_fields: bool,
}

/// Print the environment a workload's container gets in the cluster.
///
/// Computed as the kubelet does: env (with $(VAR) expansion), envFrom
/// (ConfigMaps, Secrets, prefixes), fieldRef and resourceFieldRef (from a
/// running pod of the workload, named on stderr), service-link variables
/// and KUBERNETES_*. Not included: what the image or the container runtime
/// adds (PATH, HOME, the image's ENV lines). HOSTNAME is the pod's.
///
/// Examples:
///   burrow env deploy/api -n shop                # dotenv
///   set -a; . <(burrow env deploy/api); set +a   # into this shell
///   burrow env api -o json | jq .DATABASE_URL
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct EnvArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// dotenv: NAME='value' lines quoted so that a shell's `.` and
    /// docker compose's --env-file read every value back exactly; json:
    /// one object; shell: `export NAME='value'` lines.
    #[arg(short, long, value_enum, default_value_t = EnvFormat::Dotenv)]
    pub output: EnvFormat,
    /// Also write the container's ConfigMap, Secret, downward API and
    /// projected volumes under DIR (DIR/<mountPath>; Secret files mode
    /// 0600), for a process started elsewhere (an IDE); the paths are
    /// printed on stderr.
    #[arg(long, value_name = "DIR")]
    pub files_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EnvFormat {
    Dotenv,
    Json,
    Shell,
}

/// A workload's container, its environment and its volumes.
pub struct Resolved {
    pub cluster: Cluster,
    pub workload: Workload,
    pub container: String,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub left_out: Vec<Left>,
}

impl Resolved {
    /// What was read, for stderr.
    pub fn describe(&self) -> String {
        let w = &self.workload;
        match &w.pod {
            Some(p) => format!(
                "{} container {} in namespace {}: pod fields from {}{}",
                w.display(),
                self.container,
                w.namespace,
                p.metadata.name.as_deref().unwrap_or("?"),
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .map(|n| format!(" on node {n}"))
                    .unwrap_or_default()
            ),
            None => format!(
                "{} container {} in namespace {}: no pod fields ({})",
                w.display(),
                self.container,
                w.namespace,
                w.no_pod
            ),
        }
    }
}

/// The daemon's status when connected.
pub async fn connection(global: &crate::Global) -> Option<Status> {
    let conn = daemon_conn(global).await.ok()?;
    exchange(conn, &Request::Status, false)
        .await
        .ok()
        .filter(|st| st.connected)
}

/// The cluster to talk to: what the flags say, else the connection's
/// kubeconfig, context and namespace (as later commands use them), else
/// kubectl's defaults.
pub fn target_with_connection(args: &ClusterArgs, connected: Option<&Status>) -> Target {
    let mut target = args.target();
    let env_kubeconfig = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty());
    if let Some(st) = connected
        && target.kubeconfig.is_none()
        && !env_kubeconfig
    {
        match st.kubeconfig.as_slice() {
            [] => {}
            [one] => target.kubeconfig = Some(one.clone()),
            many => target.kubeconfig_list = many.to_vec(),
        }
        if target.context.is_none() && !st.context.is_empty() {
            target.context = Some(st.context.clone());
        }
        if target.namespace.is_none() && !st.namespace.is_empty() {
            target.namespace = Some(st.namespace.clone());
        }
    }
    target
}

fn problem_error(p: Problem, w: &Workload) -> anyhow::Error {
    let ns = &w.namespace;
    let (reason, hint) = match &p {
        Problem::Missing { kind, name, key } => (
            match key {
                Some(k) => format!(
                    "{kind} {ns}/{name} has no key {k:?}, and {} needs it (not optional)",
                    w.display()
                ),
                None => format!(
                    "{kind} {ns}/{name} does not exist, and {} needs it (not optional)",
                    w.display()
                ),
            },
            format!(
                "the kubelet would not start this container either: create it \
                 (`kubectl get {} -n {ns}`), or mark the reference optional",
                kind.to_ascii_lowercase() + "s"
            ),
        ),
        Problem::Forbidden { kind, name } => (
            format!(
                "you may not read {kind} {ns}/{name}, which {} uses (your user lacks `get {}` in namespace {ns})",
                w.display(),
                kind.to_ascii_lowercase() + "s"
            ),
            format!(
                "leave the {kind}'s variables and files out with --skip-secrets, or ask a \
                 cluster admin for `get` on `{}` in {ns}",
                kind.to_ascii_lowercase() + "s"
            ),
        ),
        Problem::NeedsPod { what, field } => (
            format!(
                "{what} needs a running pod ({field}), and {}",
                if w.no_pod.is_empty() {
                    format!("{} has none", w.display())
                } else {
                    w.no_pod.clone()
                }
            ),
            format!(
                "start one (`kubectl get pods -n {ns}`), or leave such variables out with \
                 --allow-missing-pod-fields"
            ),
        ),
        Problem::NeedsNode { what, resource } => (
            format!(
                "{what} is the node's allocatable {resource} (the container sets no limit), \
                 which is unknown here"
            ),
            "leave it out with --allow-missing-pod-fields, or ask for `get nodes`".to_string(),
        ),
        Problem::Unsupported { what, why } => (format!("{what}: {why}"), String::new()),
    };
    if hint.is_empty() {
        anyhow::anyhow!("{reason}")
    } else {
        anyhow::anyhow!("{reason}\n  hint: {hint}")
    }
}

/// Finds the workload and computes its container's environment and files.
pub async fn resolve(sel: &Selection, connected: Option<&Status>) -> anyhow::Result<Resolved> {
    let wref: WorkloadRef = sel
        .workload
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{e}"))?;
    let cluster = target_with_connection(&sel.cluster, connected)
        .resolve()
        .await?;
    let namespace = cluster.namespace.clone();
    let w = workload::find(&cluster, &namespace, &wref).await?;
    let container = w.container(sel.container.as_deref())?.clone();
    let sources = workload::read_sources(
        &cluster,
        &w,
        &container,
        ReadOptions {
            skip_secrets: sel.skip_secrets,
        },
    )
    .await?;
    let (pod_ips, host_ips) = w.ips();
    let inputs = Inputs {
        spec: &w.spec,
        meta: &w.meta,
        have_pod: w.pod.is_some(),
        pod_ips,
        host_ips,
        configmaps: &sources.configmaps,
        secrets: &sources.secrets,
        services: &sources.services,
        master: sources.master.as_ref(),
        allocatable: sources.allocatable.as_ref(),
    };
    let lenient = Leniency {
        allow_missing_pod_fields: sel.allow_missing_pod_fields,
    };
    let env =
        podenv::environment(&inputs, &container, lenient).map_err(|p| problem_error(p, &w))?;
    let mut vars = env.vars;
    if w.pod.is_some() {
        let hostname = w
            .spec
            .hostname
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| w.meta.name.clone())
            .unwrap_or_default();
        vars.entry("HOSTNAME".into()).or_insert(hostname);
    }
    let (mounts, mut left) =
        podenv::mounts(&inputs, &container, &vars, lenient).map_err(|p| problem_error(p, &w))?;
    let mut left_out = env.left_out;
    left_out.append(&mut left);
    if !sources.node_note.is_empty() {
        for l in left_out
            .iter_mut()
            .filter(|l| l.why.contains("allocatable"))
        {
            l.why = format!("{}: {}", l.why, sources.node_note);
        }
    }
    drop(inputs);
    Ok(Resolved {
        cluster,
        workload: w,
        container: container.name,
        env: vars,
        mounts,
        left_out,
    })
}

/// Says on stderr which pod was read and what was left out.
pub fn report(r: &Resolved) {
    eprintln!("burrow: {}", r.describe());
    for l in &r.left_out {
        eprintln!("burrow: left out {}: {}", l.what, l.why);
    }
}

/// A shell word that gives back `s` exactly: single quotes, a `'` as
/// `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A dotenv value that a POSIX shell's `.` and docker compose's env-file
/// parser both read back exactly: single quotes when the value has none
/// (both take the text as is, newlines included), else double quotes
/// with `\`, `"`, `$` and `` ` `` escaped.
pub fn dotenv_quote(s: &str) -> String {
    if !s.contains('\'') {
        return format!("'{s}'");
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A name a shell can assign.
pub fn is_shell_name(k: &str) -> bool {
    let mut b = k.bytes();
    b.next()
        .is_some_and(|c| c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// The environment in `format`.
pub fn render(env: &BTreeMap<String, String>, format: EnvFormat) -> anyhow::Result<String> {
    if format == EnvFormat::Json {
        return Ok(serde_json::to_string_pretty(env)? + "\n");
    }
    let mut out = String::new();
    for (k, v) in env {
        if !is_shell_name(k) {
            eprintln!("burrow: variable {k:?} is not a shell name and is left out; -o json has it");
            continue;
        }
        match format {
            EnvFormat::Shell => out.push_str(&format!("export {k}={}\n", shell_quote(v))),
            _ => out.push_str(&format!("{k}={}\n", dotenv_quote(v))),
        }
    }
    Ok(out)
}

/// The invoking user under sudo (SUDO_UID/SUDO_GID), else None.
pub fn sudo_user() -> Option<(u32, u32)> {
    let uid = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    Some((uid, gid))
}

/// Writes the volumes under `dir` (`dir/<mountPath>`), Secret files 0600,
/// owned by the invoking user when run through sudo; returns (mountPath,
/// written path).
pub fn write_files_dir(dir: &Path, mounts: &[Mount]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let owner = if nix::unistd::geteuid().is_root() {
        sudo_user()
    } else {
        None
    };
    let mut written = Vec::new();
    for m in mounts {
        let rel = m.mount_path.trim_start_matches('/');
        let rel = crate::sandbox::clean_abs(&format!("/{rel}"))
            .with_context(|| format!("mountPath {:?} is not a clean path", m.mount_path))?;
        let target = dir.join(rel.trim_start_matches('/'));
        crate::sandbox::write_volume(&target, m, owner, true)
            .with_context(|| format!("writing {}", target.display()))?;
        written.push((m.mount_path.clone(), target));
    }
    Ok(written)
}

/// `burrow env ...`.
pub fn run(args: EnvArgs, global: &crate::Global) -> anyhow::Result<()> {
    let rt = crate::cli::connect::runtime()?;
    rt.block_on(async {
        let connected = connection(global).await;
        let r = resolve(&args.selection, connected.as_ref()).await?;
        report(&r);
        if let Some(dir) = &args.files_dir {
            for (mount_path, path) in write_files_dir(dir, &r.mounts)? {
                eprintln!("burrow: {mount_path} written to {}", path.display());
            }
        }
        let text = render(&r.env, args.output)?;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_values_survive_a_shell() {
        let nasty = [
            "plain",
            "with space",
            "it's",
            "dollar $HOME $(id) `id` \\ back",
            "two\nlines",
            "both ' and \" quotes",
            "=equals=",
            "ünïcode ✓",
            "",
            "trailing \\",
        ];
        let env: BTreeMap<String, String> = nasty
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("V{i}"), v.to_string()))
            .collect();
        for format in [EnvFormat::Dotenv, EnvFormat::Shell] {
            let text = render(&env, format).expect("render");
            let script = format!(
                "set -a\n{text}set +a\nfor i in $(seq 0 {}); do n=V$i; printf '%s\\0' \"${{!n}}\"; done",
                nasty.len() - 1
            );
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got: Vec<String> = out
                .stdout
                .split(|b| *b == 0)
                .filter(|_| true)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            assert_eq!(
                &got[..nasty.len()],
                nasty.map(String::from),
                "{format:?}: {text}"
            );
        }
    }

    #[test]
    fn shell_names() {
        assert!(is_shell_name("A_1"));
        assert!(is_shell_name("_x"));
        assert!(!is_shell_name("1A"));
        assert!(!is_shell_name("a.b"));
        assert!(!is_shell_name(""));
    }
}
