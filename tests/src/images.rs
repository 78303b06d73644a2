//! Container images → local programs. The miniature cluster pulls nothing:
//! each known image name maps to a program installed on the machine (Debian
//! packages) or built by the workspace.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

/// What the kubelet needs to know about a container to pick its program.
#[derive(Debug, Clone)]
pub struct ImageInput<'a> {
    pub image: &'a str,
    /// `command` (entrypoint override), already `$(VAR)`-expanded.
    pub command: Vec<String>,
    /// `args`, already expanded.
    pub args: Vec<String>,
    /// containerPorts with protocol TCP, in order.
    pub tcp_ports: Vec<u16>,
    /// The container's resolved environment.
    pub env: &'a BTreeMap<String, String>,
}

/// Where things live, for the image mapping.
#[derive(Debug, Clone)]
pub struct ImagePaths {
    /// The cluster's state dir (`www/` lives there).
    pub state_dir: PathBuf,
    /// The workspace's built binaries (`mc-echo`, `burrow-gateway`).
    pub bin_dir: PathBuf,
    /// A directory of this container's own (config, pid and temp files).
    pub work_dir: PathBuf,
}

/// How to run a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Absolute path, or a name looked up on the machine's PATH.
    pub program: String,
    pub args: Vec<String>,
    /// Environment added unless the pod sets it.
    pub default_env: Vec<(String, String)>,
    /// Files to write before starting (path, contents).
    pub files: Vec<(PathBuf, String)>,
    /// Whether the shared web root (`<state_dir>/www`) must exist.
    pub needs_www: bool,
}

/// An image this cluster can't run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "image {0:?} is not known to the miniature cluster (known: nginx, redis, socat, dnsmasq, burrow/echo, burrow-gateway, busybox, curlimages/curl, debian, alpine)"
)]
pub struct UnknownImage(pub String);

/// `docker.io/library/nginx:1.25@sha256:…` → `nginx`;
/// `ghcr.io/x/burrow-gateway:dev` → `x/burrow-gateway`.
pub fn image_repository(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A tag is a ':' after the last '/'.
    let no_tag = match (no_digest.rfind(':'), no_digest.rfind('/')) {
        (Some(c), Some(s)) if c > s => &no_digest[..c],
        (Some(c), None) => &no_digest[..c],
        _ => no_digest,
    };
    let mut parts: Vec<&str> = no_tag.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            parts.remove(0);
        }
    }
    if parts.len() > 1 && parts[0] == "library" {
        parts.remove(0);
    }
    parts.join("/")
}

fn nginx_config(paths: &ImagePaths, ports: &[u16]) -> String {
    let work = paths.work_dir.display();
    let www = www_dir(&paths.state_dir);
    let ports: Vec<u16> = if ports.is_empty() {
        vec![80]
    } else {
        ports.to_vec()
    };
    let listen: String = ports
        .iter()
        .map(|p| format!("        listen {p};\n"))
        .collect();
    format!(
        "daemon off;
master_process on;
worker_processes 1;
pid {work}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    types {{ text/html html; text/plain txt; }}
    access_log /dev/stdout;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    sendfile on;
    server {{
{listen}        server_name _;
        root {www};
        location / {{ autoindex on; }}
    }}
}}
",
        www = www.display()
    )
}

/// Maps a container to a program. `command` always wins (run from the
/// machine's PATH, args appended).
pub fn map_image(input: &ImageInput<'_>, paths: &ImagePaths) -> Result<Launch, UnknownImage> {
    let mut launch = Launch {
        program: String::new(),
        args: Vec::new(),
        default_env: Vec::new(),
        files: Vec::new(),
        needs_www: false,
    };
    if let Some((program, rest)) = input.command.split_first() {
        launch.program = program.clone();
        launch.args = rest.to_vec();
        launch.args.extend(input.args.iter().cloned());
        if let Some(port) = input.tcp_ports.first() {
            launch.default_env.push(("PORT".into(), port.to_string()));
        }
        return Ok(launch);
    }
    let repo = image_repository(input.image);
    let last = repo.rsplit('/').next().unwrap_or(&repo).to_string();
    let args = input.args.clone();
    let bin = |name: &str| paths.bin_dir.join(name).display().to_string();
    if last.starts_with("nginx") {
        launch.program = "nginx".into();
        let conf = paths.work_dir.join("nginx.conf");
        launch.args = vec![
            "-c".into(),
            conf.display().to_string(),
            "-e".into(),
            "stderr".into(),
        ];
        launch
            .files
            .push((conf, nginx_config(paths, &input.tcp_ports)));
        launch.needs_www = true;
    } else if last.starts_with("redis") {
        let port = input.tcp_ports.first().copied().unwrap_or(6379);
        launch.program = "redis-server".into();
        launch.args = [
            "--port",
            &port.to_string(),
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &paths.work_dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        launch.args.extend(args);
    } else if repo.contains("socat") {
        launch.program = "socat".into();
        launch.args = args;
    } else if repo.contains("dnsmasq") {
        launch.program = "dnsmasq".into();
        launch.args = vec![
            "-k".into(),
            format!("--pid-file={}/dnsmasq.pid", paths.work_dir.display()),
        ];
        launch.args.extend(args);
    } else if repo.starts_with("burrow/echo") || repo.contains("mc-echo") {
        launch.program = bin("mc-echo");
        launch.args = args;
        if let Some(port) = input.tcp_ports.first() {
            launch.default_env.push(("PORT".into(), port.to_string()));
        }
    } else if last.starts_with("burrow-gateway") {
        launch.program = bin("burrow-gateway");
        launch.args = args;
    } else if repo == "curlimages/curl" {
        if args.is_empty() {
            launch.program = "sleep".into();
            launch.args = vec!["infinity".into()];
        } else {
            launch.program = "curl".into();
            launch.args = args;
        }
    } else if ["busybox", "debian", "alpine", "ubuntu"].contains(&last.as_str()) {
        match args.split_first() {
            Some((p, rest)) => {
                launch.program = p.clone();
                launch.args = rest.to_vec();
            }
            None => {
                launch.program = "sleep".into();
                launch.args = vec!["infinity".into()];
            }
        }
    } else {
        return Err(UnknownImage(input.image.to_string()));
    }
    Ok(launch)
}

/// The cluster's web root: `index.html`, `1k.bin`, `100m.bin`, `SHA256SUMS`.
pub fn www_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("www")
}

/// Size of the large file.
pub const BIG_FILE_LEN: usize = 100 * 1024 * 1024;

/// Deterministic content: a 1 MiB block from a seeded xorshift PRNG,
/// repeated (each repetition's first 8 bytes hold its index so no two MiB
/// are equal).
pub fn big_file_block(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(1 << 20);
    while out.len() < (1 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

static WWW_LOCK: Mutex<()> = Mutex::new(());

/// Creates the web root once per cluster (idempotent; `SHA256SUMS` is
/// written last and marks it complete). Blocking: ~0.5 s the first time.
pub fn ensure_www(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let _guard = WWW_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = www_dir(state_dir);
    if dir.join("SHA256SUMS").exists() {
        return Ok(dir);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(
        dir.join("index.html"),
        "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n<body><h1>Welcome to nginx!</h1><p>miniature cluster</p></body></html>\n",
    )?;
    let block = big_file_block(0x6275_7272_6f77);
    fs::write(dir.join("1k.bin"), &block[..1024])?;
    {
        let path = dir.join("100m.bin");
        let mut f = std::io::BufWriter::new(
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let mut block = block;
        for i in 0..(BIG_FILE_LEN >> 20) {
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    let out = std::process::Command::new("sha256sum")
        .args(["index.html", "1k.bin", "100m.bin"])
        .current_dir(&dir)
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        anyhow::bail!("sha256sum failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tmp = dir.join(".SHA256SUMS.tmp");
    fs::write(&tmp, &out.stdout)?;
    fs::rename(&tmp, dir.join("SHA256SUMS"))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> ImagePaths {
        ImagePaths {
            state_dir: "/run/minicluster/x".into(),
            bin_dir: "/bin-dir".into(),
            work_dir: "/run/minicluster/x/pods/default_p/c".into(),
        }
    }

    fn map(
        image: &str,
        command: &[&str],
        args: &[&str],
        ports: &[u16],
    ) -> Result<Launch, UnknownImage> {
        let env = BTreeMap::new();
        map_image(
            &ImageInput {
                image,
                command: command.iter().map(|s| s.to_string()).collect(),
                args: args.iter().map(|s| s.to_string()).collect(),
                tcp_ports: ports.to_vec(),
                env: &env,
            },
            &paths(),
        )
    }

    #[test]
    fn repositories() {
        assert_eq!(image_repository("nginx"), "nginx");
        assert_eq!(image_repository("nginx:1.25"), "nginx");
        assert_eq!(
            image_repository("docker.io/library/nginx:1.25@sha256:abc"),
            "nginx"
        );
        assert_eq!(
            image_repository("localhost:5000/burrow/echo:dev"),
            "burrow/echo"
        );
        assert_eq!(
            image_repository("ghcr.io/acme/burrow-gateway:0.1"),
            "acme/burrow-gateway"
        );
    }

    #[test]
    fn known_images() {
        let n = map("nginx:1.25", &[], &[], &[80, 8080]).expect("nginx");
        assert_eq!(n.program, "nginx");
        assert!(n.needs_www);
        let conf = &n.files[0].1;
        assert!(conf.contains("daemon off;"));
        assert!(conf.contains("listen 80;") && conf.contains("listen 8080;"));
        assert!(conf.contains("root /run/minicluster/x/www;"));
        assert!(
            map("nginx", &[], &[], &[]).expect("nginx").files[0]
                .1
                .contains("listen 80;")
        );

        let r = map("redis:7", &[], &[], &[6379]).expect("redis");
        assert_eq!(r.program, "redis-server");
        assert_eq!(&r.args[..4], ["--port", "6379", "--bind", "0.0.0.0"]);
        assert!(r.args.windows(2).any(|w| w == ["--save", ""]));

        let s = map(
            "alpine/socat",
            &[],
            &["UDP-LISTEN:9000,fork", "EXEC:cat"],
            &[],
        )
        .expect("socat");
        assert_eq!((s.program.as_str(), s.args.len()), ("socat", 2));

        let d = map("dnsmasq", &[], &["--no-resolv"], &[]).expect("dnsmasq");
        assert_eq!(d.args[0], "-k");
        assert_eq!(d.args.last().map(String::as_str), Some("--no-resolv"));

        let e = map("burrow/echo:dev", &[], &[], &[8080]).expect("echo");
        assert_eq!(e.program, "/bin-dir/mc-echo");
        assert_eq!(
            e.default_env,
            vec![("PORT".to_string(), "8080".to_string())]
        );
        assert_eq!(
            map("x/mc-echo", &[], &[], &[]).expect("echo").program,
            "/bin-dir/mc-echo"
        );

        let g = map(
            "ghcr.io/acme/burrow-gateway:dev",
            &[],
            &["--listen", "0.0.0.0:7000"],
            &[],
        )
        .expect("gw");
        assert_eq!(g.program, "/bin-dir/burrow-gateway");
        assert_eq!(g.args, ["--listen", "0.0.0.0:7000"]);

        let b = map("busybox", &[], &[], &[]).expect("busybox");
        assert_eq!(
            (b.program.as_str(), b.args.as_slice()),
            ("sleep", &["infinity".to_string()][..])
        );
        let c = map("curlimages/curl:8", &[], &["-s", "http://web"], &[]).expect("curl");
        assert_eq!(c.program, "curl");
        let c = map("curlimages/curl:8", &["sleep"], &["3600"], &[]).expect("curl");
        assert_eq!(
            (c.program.as_str(), c.args.as_slice()),
            ("sleep", &["3600".to_string()][..])
        );
    }

    #[test]
    fn command_wins_and_unknown_fails() {
        let l = map("nginx", &["sh", "-c"], &["echo hi"], &[]).expect("command");
        assert_eq!(l.program, "sh");
        assert_eq!(l.args, ["-c", "echo hi"]);
        let err = map("quay.io/foo/bar:1", &[], &[], &[]).expect_err("unknown");
        assert!(
            err.to_string()
                .contains("image \"quay.io/foo/bar:1\" is not known")
        );
        assert!(err.to_string().contains("known: nginx"));
    }

    #[test]
    fn big_file_is_deterministic() {
        assert_eq!(big_file_block(7), big_file_block(7));
        assert_ne!(big_file_block(7), big_file_block(8));
        assert_eq!(big_file_block(7).len(), 1 << 20);
    }
}
