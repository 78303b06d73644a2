//! Volumes: ConfigMap, Secret, projected and downward API volumes as files,
//! and `fsGroup` ownership as the kubelet's `SetVolumeOwnership` applies it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::env::{EnvSources, field_ref, object_data};

/// One file of a volume: relative path, contents, mode.
pub type VolumeFile = (String, Vec<u8>, u32);

/// Files of a ConfigMap/Secret/projected/downwardAPI volume
/// (relative path → contents, mode). `Ok(None)`: not a file volume
/// (emptyDir, hostPath, ...).
pub fn volume_files(
    vol: &Value,
    src: &EnvSources<'_>,
    token: &dyn Fn() -> String,
    ca_pem: &str,
) -> Result<Option<Vec<VolumeFile>>, String> {
    let mut files = Vec::new();
    let default_mode = |v: &Value| v["defaultMode"].as_u64().map(|m| m as u32).unwrap_or(0o644);
    let keyed =
        |kind: &str, v: &Value, name: &str, files: &mut Vec<VolumeFile>| -> Result<(), String> {
            let optional = v["optional"].as_bool() == Some(true);
            let mode = default_mode(v);
            let what = if kind == "secrets" {
                "secret"
            } else {
                "configmap"
            };
            let Some(obj) = (src.lookup)(kind, name) else {
                if optional {
                    return Ok(());
                }
                return Err(format!("{what} \"{name}\" not found"));
            };
            let data = object_data(kind, &obj);
            match v["items"].as_array() {
                Some(items) => {
                    for it in items {
                        let key = it["key"].as_str().unwrap_or("");
                        let path = it["path"].as_str().unwrap_or(key);
                        let m = it["mode"].as_u64().map(|m| m as u32).unwrap_or(mode);
                        match data.get(key) {
                            Some(b) => files.push((path.to_string(), b.clone(), m)),
                            None if optional => {}
                            None => {
                                return Err(format!("couldn't find key {key} in {what} {name}"));
                            }
                        }
                    }
                }
                None => {
                    for (k, b) in data {
                        files.push((k, b, mode));
                    }
                }
            }
            Ok(())
        };
    let downward = |v: &Value, files: &mut Vec<VolumeFile>| -> Result<(), String> {
        for it in v["items"].as_array().into_iter().flatten() {
            let path = it["path"].as_str().unwrap_or("");
            if let Some(fp) = it["fieldRef"]["fieldPath"].as_str() {
                let val = match fp {
                    "metadata.labels" | "metadata.annotations" => {
                        let field = fp.trim_start_matches("metadata.");
                        src.pod["metadata"][field]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| format!("{k}=\"{}\"\n", v.as_str().unwrap_or("")))
                                    .collect::<String>()
                            })
                            .unwrap_or_default()
                    }
                    _ => field_ref(src.pod, fp, src.pod_ip, src.host_ip)?,
                };
                files.push((path.to_string(), val.into_bytes(), 0o644));
            }
        }
        Ok(())
    };
    if vol["configMap"].is_object() {
        let v = &vol["configMap"];
        keyed(
            "configmaps",
            v,
            v["name"].as_str().unwrap_or(""),
            &mut files,
        )?;
    } else if vol["secret"].is_object() {
        let v = &vol["secret"];
        keyed(
            "secrets",
            v,
            v["secretName"].as_str().unwrap_or(""),
            &mut files,
        )?;
    } else if vol["downwardAPI"].is_object() {
        downward(&vol["downwardAPI"], &mut files)?;
    } else if vol["projected"].is_object() {
        for s in vol["projected"]["sources"].as_array().into_iter().flatten() {
            if s["serviceAccountToken"].is_object() {
                let path = s["serviceAccountToken"]["path"].as_str().unwrap_or("token");
                files.push((path.to_string(), token().into_bytes(), 0o644));
            } else if s["configMap"].is_object() {
                let v = &s["configMap"];
                let name = v["name"].as_str().unwrap_or("");
                if name == "kube-root-ca.crt" && (src.lookup)("configmaps", name).is_none() {
                    files.push(("ca.crt".to_string(), ca_pem.as_bytes().to_vec(), 0o644));
                } else {
                    keyed("configmaps", v, name, &mut files)?;
                }
            } else if s["secret"].is_object() {
                let v = &s["secret"];
                keyed("secrets", v, v["name"].as_str().unwrap_or(""), &mut files)?;
            } else if s["downwardAPI"].is_object() {
                downward(&s["downwardAPI"], &mut files)?;
            }
        }
    } else {
        return Ok(None);
    }
    Ok(Some(files))
}

/// A path without `..` or leading `/` (keys, subPaths).
pub(super) fn safe_rel(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if path.components().all(|c| matches!(c, Component::Normal(_))) && !p.is_empty() {
        Some(path.to_path_buf())
    } else {
        None
    }
}

/// Directories 0755 all the way down (non-root containers read the
/// service-account files whatever the daemon's umask).
pub(super) fn set_tree_perms(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        for e in fs::read_dir(dir)?.flatten() {
            set_tree_perms(&e.path())?;
        }
    }
    Ok(())
}

pub(super) fn write_files(dir: &Path, files: &[VolumeFile]) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    for (rel, data, mode) in files {
        let rel = safe_rel(rel).with_context(|| format!("bad file name {rel:?} in a volume"))?;
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode & 0o777))?;
    }
    Ok(())
}

/// The kubelet's `SetVolumeOwnership` for `fsGroup`: every file and
/// directory of the volume gets group `fs_group` and group read (and write,
/// unless the volume is read-only, as Secret, ConfigMap, downward API and
/// projected volumes are) added to its mode; directories also group search
/// and setgid. Symlinks keep their mode.
pub fn set_volume_ownership(path: &Path, fs_group: u32, readonly: bool) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, None, Some(fs_group))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut mask = if readonly { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2110; // setgid, group search
    }
    let mode = meta.permissions().mode() & 0o7777;
    fs::set_permissions(path, fs::Permissions::from_mode(mode | mask))?;
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            set_volume_ownership(&e?.path(), fs_group, readonly)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::super::env::tests::{lookup, pod};
    use crate::ctx::NODE_UNDERLAY_IP;

    #[test]
    fn volumes_as_files() {
        let pod = pod();
        let src = EnvSources {
            pod: &pod,
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 9)),
            host_ip: NODE_UNDERLAY_IP,
            services: &[],
            lookup: &lookup,
        };
        let token = || "tok".to_string();
        let files = |v: Value| {
            volume_files(&v, &src, &token, "CA")
                .expect("volume")
                .expect("files")
        };
        let f = files(json!({"name": "c", "configMap": {"name": "cfg"}}));
        assert_eq!(f.len(), 2);
        let f = files(
            json!({"name": "s", "secret": {"secretName": "sec", "items": [{"key": "TOKEN", "path": "a/t", "mode": 256}]}}),
        );
        assert_eq!(f, vec![("a/t".to_string(), b"s3cr3t".to_vec(), 0o400)]);
        let f = files(json!({"name": "p", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
        ]}}));
        let names: Vec<&str> = f.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["token", "ca.crt", "namespace"]);
        assert_eq!(f[2].1, b"default");
        assert!(
            volume_files(&json!({"name": "e", "emptyDir": {}}), &src, &token, "CA")
                .expect("ok")
                .is_none()
        );
        assert!(
            volume_files(
                &json!({"name": "x", "configMap": {"name": "nope"}}),
                &src,
                &token,
                "CA"
            )
            .is_err()
        );
    }
}
