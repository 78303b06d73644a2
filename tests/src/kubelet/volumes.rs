//! Volumes: ConfigMap, Secret, projected and downward API volumes as files,
//! and `fsGroup` ownership as the kubelet's `SetVolumeOwnership` applies it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::env::{EnvSources, metadata_field, object_data, resource_field_ref};

/// One file of a volume: relative path, contents, mode.
pub type VolumeFile = (String, Vec<u8>, u32);

/// Files of a ConfigMap/Secret/projected/downwardAPI volume
/// (relative path → contents, mode), as the volume plugins make their
/// payloads (`configmap.MakePayload`, `secret.MakePayload`,
/// `downwardapi.CollectData`, projected `collectData`): a file's mode is its
/// item's `mode`, else the volume's `defaultMode` (0644; for projected
/// volumes the one at `projected.defaultMode`). `Ok(None)`: not a file
/// volume (emptyDir, hostPath, ...). `fs_group`: the pod's `fsGroup`
/// (a projected service-account token is then 0600).
pub fn volume_files(
    vol: &Value,
    src: &EnvSources<'_>,
    token: &dyn Fn() -> String,
    ca_pem: &str,
    fs_group: Option<u32>,
) -> Result<Option<Vec<VolumeFile>>, String> {
    let mut files = Vec::new();
    let mode_of = |v: &Value| v.as_u64().map(|m| m as u32);
    let keyed = |kind: &str,
                 v: &Value,
                 name: &str,
                 default_mode: u32,
                 files: &mut Vec<VolumeFile>|
     -> Result<(), String> {
        let optional = v["optional"].as_bool() == Some(true);
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
        match v["items"].as_array().filter(|i| !i.is_empty()) {
            Some(items) => {
                for it in items {
                    let key = it["key"].as_str().unwrap_or("");
                    let path = it["path"].as_str().unwrap_or(key);
                    let m = mode_of(&it["mode"]).unwrap_or(default_mode);
                    match data.get(key) {
                        Some(b) => files.push((path.to_string(), b.clone(), m)),
                        None if optional => {}
                        None => {
                            return Err(if kind == "secrets" {
                                format!("references non-existent secret key: {key}")
                            } else {
                                format!("configmap references non-existent config key: {key}")
                            });
                        }
                    }
                }
            }
            None => {
                for (k, b) in data {
                    files.push((k, b, default_mode));
                }
            }
        }
        Ok(())
    };
    let downward =
        |v: &Value, default_mode: u32, files: &mut Vec<VolumeFile>| -> Result<(), String> {
            for it in v["items"].as_array().into_iter().flatten() {
                let path = it["path"].as_str().unwrap_or("");
                let mode = mode_of(&it["mode"]).unwrap_or(default_mode);
                let val = if let Some(fp) = it["fieldRef"]["fieldPath"].as_str() {
                    metadata_field(src.pod, fp)?
                } else if it["resourceFieldRef"].is_object() {
                    resource_field_ref(src, None, &it["resourceFieldRef"])?
                } else {
                    continue;
                };
                files.push((path.to_string(), val.into_bytes(), mode));
            }
            Ok(())
        };
    let own_mode = |v: &Value| mode_of(&v["defaultMode"]).unwrap_or(0o644);
    if vol["configMap"].is_object() {
        let v = &vol["configMap"];
        let name = v["name"].as_str().unwrap_or("");
        keyed("configmaps", v, name, own_mode(v), &mut files)?;
    } else if vol["secret"].is_object() {
        let v = &vol["secret"];
        let name = v["secretName"].as_str().unwrap_or("");
        keyed("secrets", v, name, own_mode(v), &mut files)?;
    } else if vol["downwardAPI"].is_object() {
        let v = &vol["downwardAPI"];
        downward(v, own_mode(v), &mut files)?;
    } else if vol["projected"].is_object() {
        let mode = own_mode(&vol["projected"]);
        for s in vol["projected"]["sources"].as_array().into_iter().flatten() {
            if s["serviceAccountToken"].is_object() {
                let path = s["serviceAccountToken"]["path"].as_str().unwrap_or("token");
                let m = if fs_group.is_some() { 0o600 } else { mode };
                files.push((path.to_string(), token().into_bytes(), m));
            } else if s["configMap"].is_object() {
                let v = &s["configMap"];
                let name = v["name"].as_str().unwrap_or("");
                if name == "kube-root-ca.crt" && (src.lookup)("configmaps", name).is_none() {
                    files.push(("ca.crt".to_string(), ca_pem.as_bytes().to_vec(), mode));
                } else {
                    keyed("configmaps", v, name, mode, &mut files)?;
                }
            } else if s["secret"].is_object() {
                let v = &s["secret"];
                keyed(
                    "secrets",
                    v,
                    v["name"].as_str().unwrap_or(""),
                    mode,
                    &mut files,
                )?;
            } else if s["downwardAPI"].is_object() {
                downward(&s["downwardAPI"], mode, &mut files)?;
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

/// Writes a volume's files as the kubelet's `AtomicWriter` lays them out:
/// the files in a timestamped directory `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN`,
/// a symlink `..data` to it, and for each top-level name a symlink
/// `name → ..data/name` (what `ls -la` shows in a real pod; `stat -L`
/// and reads see the files).
pub(super) fn write_atomic(dir: &Path, files: &[VolumeFile]) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .trim_end_matches('Z')
        .replace(['-', 'T', ':'], "_");
    let ts_name = format!("..{stamp}.{:09}", now.subsec_nanos());
    let ts = dir.join(&ts_name);
    write_files(&ts, files)?;
    fs::set_permissions(&ts, fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::symlink(&ts_name, dir.join("..data"))?;
    let mut tops: Vec<String> = Vec::new();
    for (rel, _, _) in files {
        if let Some(first) = Path::new(rel).components().next() {
            let first = first.as_os_str().to_string_lossy().into_owned();
            if !tops.contains(&first) {
                std::os::unix::fs::symlink(format!("..data/{first}"), dir.join(&first))?;
                tops.push(first);
            }
        }
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

    use serde_json::json;

    use super::super::env::tests::{pod, sources};

    #[test]
    fn volumes_as_files() {
        let pod = pod();
        let alloc = json!({"cpu": "2", "memory": "4Gi", "ephemeral-storage": "20Gi"});
        let src = sources(&pod, &[], &alloc);
        let token = || "tok".to_string();
        let files = |v: Value| {
            volume_files(&v, &src, &token, "CA", None)
                .expect("volume")
                .expect("files")
        };
        let f = files(json!({"name": "c", "configMap": {"name": "cfg"}}));
        assert_eq!(f.len(), 3, "data and binaryData: {f:?}");
        assert!(f.iter().all(|x| x.2 == 0o644));
        let f = files(
            json!({"name": "c", "configMap": {"name": "cfg", "defaultMode": 0o440,
            "items": [{"key": "GREETING", "path": "sub/dir/g.txt"}, {"key": "MODE", "path": "m", "mode": 0o600}, {"key": "BIN", "path": "b"}]}}),
        );
        assert_eq!(
            f,
            vec![
                ("sub/dir/g.txt".to_string(), b"hello".to_vec(), 0o440),
                ("m".to_string(), b"fast".to_vec(), 0o600),
                ("b".to_string(), vec![0, 1, 2], 0o440),
            ]
        );
        let f = files(
            json!({"name": "s", "secret": {"secretName": "sec", "items": [{"key": "TOKEN", "path": "a/t", "mode": 256}]}}),
        );
        assert_eq!(f, vec![("a/t".to_string(), b"s3cr3t".to_vec(), 0o400)]);
        let f = files(json!({"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o400}}));
        assert_eq!(f, vec![("TOKEN".to_string(), b"s3cr3t".to_vec(), 0o400)]);
        let f = files(
            json!({"name": "p", "projected": {"defaultMode": 0o440, "sources": [
                {"serviceAccountToken": {"path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"secret": {"name": "sec", "items": [{"key": "TOKEN", "path": "s/t", "mode": 0o400}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
            ]}}),
        );
        let got: Vec<(&str, u32)> = f.iter().map(|x| (x.0.as_str(), x.2)).collect();
        assert_eq!(
            got,
            [
                ("token", 0o440),
                ("ca.crt", 0o440),
                ("s/t", 0o400),
                ("namespace", 0o440)
            ]
        );
        assert_eq!(f[3].1, b"default");
        // The token is 0600 under an fsGroup.
        let f = volume_files(
            &json!({"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}),
            &src,
            &token,
            "CA",
            Some(2000),
        )
        .expect("ok")
        .expect("files");
        assert_eq!(f[0].2, 0o600);
        assert!(
            volume_files(
                &json!({"name": "e", "emptyDir": {}}),
                &src,
                &token,
                "CA",
                None
            )
            .expect("ok")
            .is_none()
        );
        let err = |v: Value| volume_files(&v, &src, &token, "CA", None).expect_err("error");
        assert_eq!(
            err(json!({"name": "x", "configMap": {"name": "nope"}})),
            "configmap \"nope\" not found"
        );
        assert_eq!(
            err(
                json!({"name": "x", "configMap": {"name": "cfg", "items": [{"key": "NOPE", "path": "n"}]}})
            ),
            "configmap references non-existent config key: NOPE"
        );
        assert_eq!(
            err(
                json!({"name": "x", "secret": {"secretName": "sec", "items": [{"key": "NOPE", "path": "n"}]}})
            ),
            "references non-existent secret key: NOPE"
        );
        // Optional: a missing object or key is no file.
        assert!(
            files(json!({"name": "x", "secret": {"secretName": "gone", "optional": true}}))
                .is_empty()
        );
        assert!(files(json!({"name": "x", "configMap": {"name": "cfg", "optional": true, "items": [{"key": "NOPE", "path": "n"}]}})).is_empty());
    }

    #[test]
    fn atomic_writer_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("v");
        write_atomic(
            &vol,
            &[
                ("a".into(), b"A".to_vec(), 0o400),
                ("sub/dir/b".into(), b"B".to_vec(), 0o644),
                ("sub/c".into(), b"C".to_vec(), 0o600),
            ],
        )
        .expect("write");
        let link = |p: &str| fs::read_link(vol.join(p)).expect("symlink");
        assert_eq!(link("a"), Path::new("..data/a"));
        assert_eq!(link("sub"), Path::new("..data/sub"));
        let data = link("..data");
        let name = data.to_string_lossy().into_owned();
        assert!(
            name.starts_with("..20") && name.len() == "..2026_12_06_13_40_00.123456789".len(),
            "{name}"
        );
        assert_eq!(fs::read(vol.join("sub/dir/b")).expect("read"), b"B");
        let mode = |p: &str| {
            fs::metadata(vol.join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("a"), mode("sub/c")), (0o400, 0o600));
        let mut names: Vec<String> = fs::read_dir(&vol)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [name.as_str(), "..data", "a", "sub"]);
    }

    #[test]
    fn downward_api_files() {
        let mut pod = pod();
        pod["metadata"]["labels"] =
            json!({"tier": "back end", "app": "echo", "q": "say \"hi\"\\n\u{e9}\t"});
        pod["metadata"]["annotations"] = json!({"b": "2", "a": "1"});
        pod["spec"]["containers"] = json!([
            {"name": "main", "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m", "memory": "32Mi"}}},
            {"name": "side", "resources": {}}
        ]);
        let alloc = json!({"cpu": "2", "memory": "4Gi", "ephemeral-storage": "20Gi"});
        let src = sources(&pod, &[], &alloc);
        let token = || "tok".to_string();
        let f = volume_files(
            &json!({"name": "d", "downwardAPI": {"defaultMode": 0o400, "items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}, "mode": 0o644},
                {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
                {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                {"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}},
                {"path": "cpu_limit", "resourceFieldRef": {"containerName": "main", "resource": "limits.cpu", "divisor": "1m"}},
                {"path": "mem_req", "resourceFieldRef": {"containerName": "main", "resource": "requests.memory", "divisor": "1Mi"}},
                {"path": "side_cpu_limit", "resourceFieldRef": {"containerName": "side", "resource": "limits.cpu"}},
                {"path": "side_mem_limit", "resourceFieldRef": {"containerName": "side", "resource": "limits.memory", "divisor": "1Mi"}},
                {"path": "side_cpu_req", "resourceFieldRef": {"containerName": "side", "resource": "requests.cpu"}}
            ]}}),
            &src,
            &token,
            "CA",
            None,
        )
        .expect("ok")
        .expect("files");
        let get = |p: &str| {
            let x = f.iter().find(|x| x.0 == p).unwrap_or_else(|| panic!("{p}"));
            (String::from_utf8(x.1.clone()).expect("utf8"), x.2)
        };
        assert_eq!(
            get("labels"),
            (
                "app=\"echo\"\nq=\"say \\\"hi\\\"\\\\n\u{e9}\\t\"\ntier=\"back end\"".to_string(),
                0o400
            )
        );
        assert_eq!(get("annotations"), ("a=\"1\"\nb=\"2\"".to_string(), 0o644));
        assert_eq!(get("app").0, "echo");
        assert_eq!(get("name").0, "echo-1");
        assert_eq!(get("uid").0, "abcdef12-3456");
        assert_eq!(get("cpu_limit").0, "500");
        assert_eq!(get("mem_req").0, "32");
        assert_eq!(get("side_cpu_limit").0, "2");
        assert_eq!(get("side_mem_limit").0, "4096");
        assert_eq!(get("side_cpu_req").0, "0");
        // Pod fields other than metadata are not for volumes.
        assert!(
            volume_files(
                &json!({"name": "d", "downwardAPI": {"items": [{"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}}]}}),
                &src,
                &token,
                "CA",
                None
            )
            .is_err()
        );
    }
}
