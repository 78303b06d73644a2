//! Discovery documents (`/api`, `/apis`, APIResourceLists), `/version` and a
//! minimal OpenAPI v3 document generated from the resource table: enough for
//! kubectl to find every PATCH operation with its
//! `x-kubernetes-group-version-kind` and the `fieldValidation` parameter.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::resources::{RESOURCES, ResourceType};

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "emulationMajor": "1",
        "emulationMinor": "32",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "31",
        "gitVersion": "v1.32.0",
        "gitCommit": "70d3cc986aa8221cd1dfb1121852688902d3bf53",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T17:59:15Z",
        "goVersion": "go1.23.3",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The named groups served, in table order, each with its versions.
fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, vs)) => {
                if !vs.contains(&r.version) {
                    vs.push(r.version);
                }
            }
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_json(name: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().iter().map(|(g, vs)| group_json(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn api_group(group: &str) -> Option<Value> {
    let (g, vs) = groups().into_iter().find(|(g, _)| *g == group)?;
    let mut v = group_json(g, &vs);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Some(v)
}

const MAIN_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn categories(rt: &ResourceType) -> Option<Value> {
    matches!(rt.kind, "Pod" | "Service" | "Deployment" | "ReplicaSet").then(|| json!(["all"]))
}

fn subresource_entry(rt: &ResourceType, sub: &str) -> Value {
    let (kind, verbs, group, version): (&str, &[&str], Option<&str>, Option<&str>) = match sub {
        "status" => (rt.kind, &["get", "patch", "update"], None, None),
        "portforward" => ("PodPortForwardOptions", &["create", "get"], None, None),
        "log" => ("Pod", &["get"], None, None),
        "exec" => ("PodExecOptions", &["create", "get"], None, None),
        "scale" => (
            "Scale",
            &["get", "patch", "update"],
            Some("autoscaling"),
            Some("v1"),
        ),
        _ => (rt.kind, &["get"], None, None),
    };
    let mut e = json!({
        "name": format!("{}/{}", rt.plural, sub),
        "singularName": "",
        "namespaced": rt.namespaced,
        "kind": kind,
        "verbs": verbs,
    });
    if let Some(g) = group {
        e["group"] = json!(g);
    }
    if let Some(v) = version {
        e["version"] = json!(v);
    }
    e
}

/// `/api/v1` or `/apis/<group>/<version>`.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let rts: Vec<&ResourceType> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if rts.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for rt in &rts {
        let mut e = json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": if rt.is_virtual() { json!(["create"]) } else { json!(MAIN_VERBS) },
            "storageVersionHash": storage_hash(rt),
        });
        if !rt.short_names.is_empty() {
            e["shortNames"] = json!(rt.short_names);
        }
        if let Some(c) = categories(rt) {
            e["categories"] = c;
        }
        resources.push(e);
        for sub in rt.subresources {
            resources.push(subresource_entry(rt, sub));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn storage_hash(rt: &ResourceType) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(&fnv(&rt.key()).to_be_bytes()[..8])
}

/// The content type of `/openapi/v2` in gnostic's protobuf form. kubectl
/// asks for `...spec.v2@v1.0+protobuf`; the real server answers with `.`
/// for `@`, which Go's media-type parser accepts.
pub const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// The OpenAPI v2 (Swagger) document, as JSON: no paths and no
/// definitions. kubectl still reads v2 where v3 has no answer — the
/// client-side validation of `kind: List` files (`kubectl apply -f` of a
/// List) and the strategic-merge fallback of client-side apply — and treats
/// a kind without a definition as "nothing to check, use the built-in
/// types", which is what the v3 stubs say too.
pub fn openapi_v2() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": {},
        "definitions": {},
    })
}

/// [`openapi_v2`] in the protobuf encoding of gnostic's
/// `openapi.v2.Document` (swagger = 1, info = 2 {title = 1, version = 2},
/// paths = 8, definitions = 9), which is what client-go's
/// `OpenAPISchema()` requests and decodes.
pub fn openapi_v2_protobuf() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, data: &[u8]) {
        // Length-delimited (wire type 2); every length here is < 128.
        out.push((number << 3) | 2);
        out.push(u8::try_from(data.len()).unwrap_or(0));
        out.extend_from_slice(data);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"Kubernetes");
    field(&mut info, 2, b"v1.32.0");
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0");
    field(&mut doc, 2, &info);
    field(&mut doc, 8, &[]);
    field(&mut doc, 9, &[]);
    doc
}

/// The OpenAPI v3 discovery root: one entry per group-version.
pub fn openapi_v3_root() -> Value {
    let mut paths = BTreeMap::new();
    let mut gvs: Vec<(String, String)> = Vec::new();
    for rt in RESOURCES {
        let gv = (rt.group.to_string(), rt.version.to_string());
        if !gvs.contains(&gv) {
            gvs.push(gv);
        }
    }
    for (g, v) in gvs {
        let path = openapi_path(&g, &v);
        let hash = format!(
            "{:016X}",
            fnv(&openapi_v3_gv(&g, &v)
                .map(|d| d.to_string())
                .unwrap_or_default())
        );
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

fn openapi_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn query_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

/// The OpenAPI v3 document of one group-version (`api/v1`,
/// `apis/apps/v1`): the paths and operations, with tiny schemas.
pub fn openapi_v3_gv(group: &str, version: &str) -> Option<Value> {
    let rts: Vec<&ResourceType> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if rts.is_empty() {
        return None;
    }
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let tag = if group.is_empty() {
        format!("core_{version}")
    } else {
        format!("{}_{version}", group.split('.').next().unwrap_or(group))
    };
    let object_ref =
        json!({"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Object"});
    let patch_ref = json!({"schema": {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}});
    let mut paths = serde_json::Map::new();
    for rt in rts {
        let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
        let base = if rt.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", rt.plural)
        } else {
            format!("{prefix}/{}", rt.plural)
        };
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": object_ref}}}});
        let op = |action: &str, verb: &str, params: Vec<Value>| {
            json!({
                "tags": [tag],
                "operationId": format!("{verb}{}", rt.kind),
                "parameters": params,
                "responses": ok,
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let write_params = || {
            vec![
                query_param(
                    "dryRun",
                    "When present, indicates that modifications should not be persisted.",
                ),
                query_param(
                    "fieldManager",
                    "fieldManager is a name associated with the actor or entity that is making these changes.",
                ),
                query_param(
                    "fieldValidation",
                    "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields.",
                ),
            ]
        };
        let mut patch_params = write_params();
        patch_params.push(query_param(
            "force",
            "Force is going to \"force\" Apply requests.",
        ));
        let mut patch_op = op("patch", "patch", patch_params);
        patch_op["requestBody"] = json!({
            "content": {
                "application/apply-patch+yaml": patch_ref,
                "application/json-patch+json": patch_ref,
                "application/merge-patch+json": patch_ref,
            },
            "required": true,
        });
        let mut put_op = op("put", "replace", write_params());
        put_op["requestBody"] =
            json!({"content": {"*/*": {"schema": object_ref}}, "required": true});
        let mut post_op = op("post", "create", write_params());
        post_op["requestBody"] =
            json!({"content": {"*/*": {"schema": object_ref}}, "required": true});
        let name_param = json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}});
        let ns_param = json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}});
        let mut path_params = vec![name_param];
        let mut coll_params = vec![];
        if rt.namespaced {
            path_params.push(ns_param.clone());
            coll_params.push(ns_param);
        }
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": op("get", "read", vec![]),
                "put": put_op,
                "patch": patch_op,
                "delete": op("delete", "delete", vec![query_param("dryRun", "")]),
                "parameters": path_params,
            }),
        );
        paths.insert(
            base.clone(),
            json!({
                "get": op("list", "list", vec![query_param("labelSelector", ""), query_param("fieldSelector", ""), query_param("watch", "")]),
                "post": post_op,
                "delete": op("deletecollection", "deletecollection", vec![]),
                "parameters": coll_params,
            }),
        );
        if rt.has_status() {
            let mut status_patch = op(
                "patch",
                "patchStatus",
                vec![
                    query_param("fieldValidation", ""),
                    query_param("fieldManager", ""),
                ],
            );
            status_patch["requestBody"] = json!({
                "content": {
                    "application/apply-patch+yaml": patch_ref,
                    "application/json-patch+json": patch_ref,
                    "application/merge-patch+json": patch_ref,
                },
                "required": true,
            });
            paths.insert(
                format!("{base}/{{name}}/status"),
                json!({"get": op("get", "readStatus", vec![]), "patch": status_patch, "parameters": path_params}),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {
            "io.k8s.apimachinery.pkg.apis.meta.v1.Patch": {"description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.", "type": "object"},
            "io.k8s.apimachinery.pkg.apis.meta.v1.Object": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        }},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_v2_protobuf_is_a_gnostic_document() {
        let b = openapi_v2_protobuf();
        // swagger (1) = "2.0", info (2) = {title, version}, paths (8),
        // definitions (9), both empty.
        let info: Vec<u8> = [&[0x0a, 10][..], b"Kubernetes", &[0x12, 7][..], b"v1.32.0"].concat();
        let want: Vec<u8> = [
            &[0x0a, 3][..],
            b"2.0",
            &[0x12, info.len() as u8][..],
            &info,
            &[0x42, 0, 0x4a, 0][..],
        ]
        .concat();
        assert_eq!(b, want);
        assert_eq!(openapi_v2()["swagger"], "2.0");
        // Go's mime parser must accept the content type (no '@').
        assert!(!OPENAPI_V2_PROTOBUF.contains('@'));
    }
}
