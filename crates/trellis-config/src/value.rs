//! Config documents as JSON values: parsing, merging with provenance,
//! placeholders and the environment layer.

use std::{collections::BTreeMap, path::Path};

use serde_json::{Map, Value};

use crate::ConfigError;

/// One layer of configuration: a document and where it came from. What a
/// [`Source`](crate::Source) loads.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// `file ./config.toml`, `env TRELLIS_`, `etcd /trellis/config/user/`.
    pub(crate) source: String,
    /// Always an object.
    pub(crate) doc: Value,
    /// A version the source gives (etcd revision), if any.
    pub(crate) version: Option<String>,
}

impl Layer {
    /// A layer holding `doc`; `source` names it in errors and provenance
    /// (`consul kv/shop/user`).
    pub fn new(source: impl Into<String>, doc: Map<String, Value>) -> Layer {
        Layer {
            source: source.into(),
            doc: Value::Object(doc),
            version: None,
        }
    }

    /// A layer of flat settings, read as the environment and etcd layers
    /// read theirs: `a.b` or `a/b` keys, values typed when they parse as
    /// JSON (`5`, `true`, `{"x":1}`), strings otherwise.
    pub fn from_settings<K: AsRef<str>, V: AsRef<str>>(
        source: impl Into<String>,
        settings: impl IntoIterator<Item = (K, V)>,
    ) -> Layer {
        let mut doc = Value::Object(Map::new());
        for (key, value) in settings {
            let segments: Vec<String> = key
                .as_ref()
                .split(['/', '.'])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if !segments.is_empty() {
                set_path(&mut doc, &segments, scalar(value.as_ref()));
            }
        }
        Layer {
            source: source.into(),
            doc,
            version: None,
        }
    }

    /// The version the source gives this layer (a revision, an index),
    /// shown in [`Snapshot::sources`](crate::Snapshot::sources).
    pub fn with_version(mut self, version: impl Into<String>) -> Layer {
        self.version = Some(version.into());
        self
    }

    /// Where it came from.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The merged document and, per leaf path, the source that set it.
pub(crate) struct Merged {
    pub(crate) doc: Value,
    pub(crate) provenance: BTreeMap<String, String>,
}

impl Merged {
    /// The source of `path` or of its nearest ancestor that has one.
    pub(crate) fn source_of(&self, path: &str) -> Option<&str> {
        let mut p = path;
        loop {
            if let Some(s) = self.provenance.get(p) {
                return Some(s);
            }
            // Paths look like `a.b[2].c`: strip the last segment.
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }
}

/// Merges layers, lowest first: objects merge key by key, anything else
/// replaces what was below it.
pub(crate) fn merge(layers: &[Layer]) -> Merged {
    let mut doc = Value::Object(Map::new());
    let mut provenance = BTreeMap::new();
    for layer in layers {
        merge_into(&mut doc, &layer.doc, "", &layer.source, &mut provenance);
    }
    Merged { doc, provenance }
}

fn merge_into(
    base: &mut Value,
    top: &Value,
    path: &str,
    source: &str,
    provenance: &mut BTreeMap<String, String>,
) {
    match (base, top) {
        (Value::Object(b), Value::Object(t)) => {
            for (k, v) in t {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_into(existing, v, &child, source, provenance)
                    }
                    _ => {
                        // Everything under the replaced key now comes from `source`.
                        provenance
                            .retain(|p, _| !(p == &child || p.starts_with(&format!("{child}."))));
                        provenance.insert(child, source.to_owned());
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (base, top) => {
            *base = top.clone();
            provenance.insert(path.to_owned(), source.to_owned());
        }
    }
}

/// Sets `value` at `segments` inside `doc`, creating objects on the way;
/// a scalar in the way is replaced.
pub(crate) fn set_path(doc: &mut Value, segments: &[String], value: Value) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut cursor = doc;
    for segment in parents {
        if !cursor.is_object() {
            *cursor = Value::Object(Map::new());
        }
        let Value::Object(map) = cursor else { return };
        cursor = map
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cursor.is_object() {
        *cursor = Value::Object(Map::new());
    }
    if let Value::Object(map) = cursor {
        map.insert(last.clone(), value);
    }
}

/// A text value from the environment or etcd: JSON when it parses as a
/// number, boolean, array or object, otherwise the string itself. Quote a
/// number (`"8080"`) to keep it a string.
pub(crate) fn scalar(text: &str) -> Value {
    let t = text.trim();
    let looks_structured = t.starts_with(['{', '[', '"'])
        || t == "true"
        || t == "false"
        || t == "null"
        || t.parse::<f64>().is_ok();
    if looks_structured && let Ok(v) = serde_json::from_str::<Value>(t) {
        return v;
    }
    Value::String(text.to_owned())
}

/// The environment layer: `{PREFIX}_A__B=v` sets `a.b` (lower-cased).
pub(crate) fn env_layer(prefix: &str, vars: impl IntoIterator<Item = (String, String)>) -> Layer {
    let lead = format!("{prefix}_");
    let mut doc = Value::Object(Map::new());
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(&lead) else {
            continue;
        };
        let segments: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            continue;
        }
        set_path(&mut doc, &segments, scalar(&value));
    }
    Layer {
        source: format!("env {lead}*"),
        doc,
        version: None,
    }
}

/// Parses a file by extension (`.toml`, `.yaml`/`.yml`, `.json`) into an object.
pub(crate) fn parse_file(path: &Path, text: &str) -> Result<Value, ConfigError> {
    let bad = |reason: String| ConfigError::Parse {
        source_name: format!("file {}", path.display()),
        reason,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let doc: Value = match ext.as_str() {
        // toml's Display quotes the offending line, which may hold a secret:
        // say where and what, not the text.
        "toml" => toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            bad(format!("{}{}", at.unwrap_or_default(), e.message().trim()))
        })?,
        "yaml" | "yml" => {
            if text.trim().is_empty() {
                Value::Object(Map::new())
            } else {
                serde_yaml_ng::from_str(text).map_err(|e| bad(e.to_string()))?
            }
        }
        "json" => serde_json::from_str(text).map_err(|e| bad(e.to_string()))?,
        other => {
            return Err(bad(format!(
                "unknown format {other:?}; use .toml, .yaml, .yml or .json"
            )));
        }
    };
    match doc {
        Value::Object(_) => Ok(doc),
        Value::Null => Ok(Value::Object(Map::new())),
        _ => Err(bad("the top level must be a table/mapping".into())),
    }
}

/// Replaces `${NAME}` and `${NAME:default}` in every string of `doc` from
/// `env`. A string that is a single placeholder takes the scalar type of its
/// result (`port: "${PORT:8080}"` is a number). `$${` is a literal `${`.
pub(crate) fn expand_placeholders(
    doc: &mut Value,
    env: &dyn Fn(&str) -> Option<String>,
    source: &str,
    path: &str,
) -> Result<(), ConfigError> {
    match doc {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                expand_placeholders(v, env, source, &child)?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                expand_placeholders(v, env, source, &format!("{path}[{i}]"))?;
            }
        }
        Value::String(s) if s.contains("${") => {
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let expanded = expand(s, env).map_err(|name| ConfigError::Placeholder {
                key: path.to_owned(),
                source_name: source.to_owned(),
                variable: name,
            })?;
            *doc = if whole {
                scalar(&expanded)
            } else {
                Value::String(expanded)
            };
        }
        _ => {}
    }
    Ok(())
}

/// Expands one string; `Err(name)` for an unset variable without default.
fn expand(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${")
            && let Some(end) = tail.find('}')
        {
            let inner = &tail[..end];
            let (name, default) = match inner.split_once(':') {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(name.to_owned()),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.internal".into()),
            "PORT" => Some("5432".into()),
            _ => None,
        }
    }

    #[test]
    fn placeholders() {
        let mut doc = json!({
            "url": "postgres://${HOST}:${PORT}/shop",
            "port": "${PORT}",
            "missing_with_default": "${NOPE:fallback}",
            "empty_default": "${NOPE:}",
            "literal": "cost $5 and $${NOT}",
            "list": ["${HOST}"]
        });
        expand_placeholders(&mut doc, &env, "file x", "").unwrap();
        assert_eq!(
            doc,
            json!({
                "url": "postgres://db.internal:5432/shop",
                "port": 5432,
                "missing_with_default": "fallback",
                "empty_default": "",
                "literal": "cost $5 and ${NOT}",
                "list": ["db.internal"]
            })
        );
    }

    #[test]
    fn unset_placeholder_names_key_source_and_variable() {
        let mut doc = json!({"db": {"url": "${DATABASE_URL}"}});
        let err = expand_placeholders(&mut doc, &env, "file ./c.toml", "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "db.url in file ./c.toml: environment variable DATABASE_URL is not set and has no default"
        );
    }

    #[test]
    fn env_layer_nests_and_types() {
        let layer = env_layer(
            "TRELLIS",
            [
                (
                    "TRELLIS_SERVER__REQUEST_TIMEOUT".to_owned(),
                    "5s".to_owned(),
                ),
                (
                    "TRELLIS_DATABASE__MAX_CONNECTIONS".to_owned(),
                    "16".to_owned(),
                ),
                ("TRELLIS_FLAG".to_owned(), "true".to_owned()),
                ("TRELLIS_QUOTED".to_owned(), "\"8080\"".to_owned()),
                ("OTHER_X".to_owned(), "1".to_owned()),
                ("TRELLIS_BAD____X".to_owned(), "1".to_owned()),
            ],
        );
        assert_eq!(
            layer.doc,
            json!({"server": {"request_timeout": "5s"}, "database": {"max_connections": 16}, "flag": true, "quoted": "8080"})
        );
    }

    #[test]
    fn merge_tracks_the_source_of_each_key() {
        let a = Layer {
            source: "file a".into(),
            doc: json!({"s": {"x": 1, "y": 2}, "z": {"k": 1}}),
            version: None,
        };
        let b = Layer {
            source: "env".into(),
            doc: json!({"s": {"y": 3}, "z": 5}),
            version: None,
        };
        let m = merge(&[a, b]);
        assert_eq!(m.doc, json!({"s": {"x": 1, "y": 3}, "z": 5}));
        assert_eq!(m.source_of("s.x"), Some("file a"));
        assert_eq!(m.source_of("s.y"), Some("env"));
        assert_eq!(m.source_of("z"), Some("env"));
        assert_eq!(m.source_of("z.k"), Some("env"));
        assert_eq!(m.source_of("nope"), None);
    }

    #[test]
    fn parses_each_format() {
        let toml = parse_file(Path::new("a.toml"), "[server]\nport = 1\n").unwrap();
        let yaml = parse_file(Path::new("a.yaml"), "server:\n  port: 1\n").unwrap();
        let json = parse_file(Path::new("a.json"), r#"{"server":{"port":1}}"#).unwrap();
        assert_eq!(toml, yaml);
        assert_eq!(yaml, json);
        assert!(
            parse_file(Path::new("a.yaml"), "")
                .unwrap()
                .as_object()
                .unwrap()
                .is_empty()
        );
        let err = parse_file(Path::new("a.toml"), "[server\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("file a.toml"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let err = parse_file(
            Path::new("a.toml"),
            "[db]\nurl = \"postgres://app:hunter2@db/shop\nx = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("hunter2"),
            "a parse error quoted the secret: {err}"
        );
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_file(Path::new("a.ini"), "").is_err());
        assert!(parse_file(Path::new("a.json"), "[1]").is_err());
    }
}
