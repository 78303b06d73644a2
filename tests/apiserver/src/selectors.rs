//! Label and field selectors, as in `?labelSelector=` and `?fieldSelector=`.

use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    reqs: Vec<(String, Op)>,
}

/// Splits at top-level commas (not inside parentheses).
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |part: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: invalid label selector: {part:?}"
            ))
        };
        let mut reqs = Vec::new();
        for part in split_top(s) {
            if let Some(key) = part.strip_prefix('!') {
                reqs.push((key.trim().to_string(), Op::NotExists));
            } else if let Some((k, v)) = part.split_once("!=") {
                reqs.push((k.trim().to_string(), Op::NotEq(v.trim().to_string())));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push((k.trim().to_string(), Op::Eq(v.trim().to_string())));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push((k.trim().to_string(), Op::Eq(v.trim().to_string())));
            } else if let Some(idx) = part.find(" notin ") {
                let vals = set_values(&part[idx + 7..]).ok_or_else(|| bad(part))?;
                reqs.push((part[..idx].trim().to_string(), Op::NotIn(vals)));
            } else if let Some(idx) = part.find(" in ") {
                let vals = set_values(&part[idx + 4..]).ok_or_else(|| bad(part))?;
                reqs.push((part[..idx].trim().to_string(), Op::In(vals)));
            } else if part.contains(['(', ')', ' ']) {
                return Err(bad(part));
            } else {
                reqs.push((part.to_string(), Op::Exists));
            }
        }
        Ok(LabelSelector { reqs })
    }

    /// A selector from a `matchLabels`/`matchExpressions` LabelSelector
    /// object (as in a Deployment's `spec.selector`).
    pub fn from_object(sel: &Value) -> Self {
        let mut reqs = Vec::new();
        if let Some(m) = sel["matchLabels"].as_object() {
            for (k, v) in m {
                reqs.push((k.clone(), Op::Eq(v.as_str().unwrap_or("").to_string())));
            }
        }
        if let Some(exprs) = sel["matchExpressions"].as_array() {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or("").to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|vs| {
                        vs.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let op = match e["operator"].as_str() {
                    Some("In") => Op::In(values),
                    Some("NotIn") => Op::NotIn(values),
                    Some("Exists") => Op::Exists,
                    _ => Op::NotExists,
                };
                reqs.push((key, op));
            }
        }
        LabelSelector { reqs }
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Whether the labels (a JSON map, or null) satisfy the selector.
    pub fn matches_labels(&self, labels: &Value) -> bool {
        self.reqs.iter().all(|(k, op)| {
            let v = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq(want) => v == Some(want.as_str()),
                Op::NotEq(want) => v != Some(want.as_str()),
                Op::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::NotIn(set) => !v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.matches_labels(&obj["metadata"]["labels"])
    }
}

/// A parsed field selector (`a=b,c!=d`).
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            reqs.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    /// The name a selector pins (`metadata.name=x`), for watches.
    pub fn name(&self) -> Option<&str> {
        self.reqs
            .iter()
            .find(|(k, eq, _)| *eq && k == "metadata.name")
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(k, eq, want)| {
            let mut cur = obj;
            for seg in k.split('.') {
                cur = &cur[seg];
            }
            let got = match cur {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                other => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "echo", "tier": "web"}}});
        for (s, want) in [
            ("app=echo", true),
            ("app==echo", true),
            ("app!=echo", false),
            ("app in (echo, other),tier", true),
            ("app notin (echo)", false),
            ("!missing", true),
            ("!app", false),
            ("tier=web,app=x", false),
            ("", true),
        ] {
            assert_eq!(LabelSelector::parse(s).expect(s).matches(&o), want, "{s}");
        }
        let f = FieldSelector::parse("metadata.name=a,status.phase!=Running").expect("fs");
        assert!(f.matches(&json!({"metadata": {"name": "a"}, "status": {"phase": "Pending"}})));
        assert!(!f.matches(&json!({"metadata": {"name": "a"}, "status": {"phase": "Running"}})));
        assert_eq!(f.name(), Some("a"));
    }
}
