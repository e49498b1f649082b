//! OpenAPI 3.1 from the same descriptors the transcoder routes by: one
//! operation per REST binding, schemas in the proto3 JSON mapping, and the
//! proto comments as summaries and descriptions.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value as Json, json};

use crate::{
    Binding, Transcoder,
    annotations::{OUTPUT_ONLY, Rule, field_behaviors, field_rules},
};

/// The OpenAPI 3.1 document for a transcoder's routes.
pub fn openapi(transcoder: &Transcoder) -> Json {
    let mut doc = Doc {
        schemas: BTreeMap::new(),
        pending: BTreeSet::new(),
    };
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    let mut services = BTreeSet::new();
    let mut bindings = transcoder.bindings();
    bindings.sort_by(|a, b| {
        (a.template.as_str(), a.method.as_str()).cmp(&(b.template.as_str(), b.method.as_str()))
    });
    for b in &bindings {
        let service = b.rpc.parent_service();
        services.insert(service.full_name().to_owned());
        let (path, operation) = doc.operation(b);
        paths
            .entry(path)
            .or_default()
            .insert(b.method.as_str().to_ascii_lowercase(), operation);
    }
    // Every method by its gRPC name too.
    for name in &services {
        if let Some(service) = transcoder.pool().get_service_by_name(name) {
            for rpc in service.methods() {
                let b = Binding {
                    method: http::Method::POST,
                    template: format!("/{}/{}", service.full_name(), rpc.name()),
                    path_fields: Vec::new(),
                    body: Some("*".into()),
                    response_body: None,
                    rpc: rpc.clone(),
                };
                let (path, mut operation) = doc.operation(&b);
                if let Some(id) = operation
                    .get("operationId")
                    .and_then(Json::as_str)
                    .map(|s| format!("{s}_rpc"))
                {
                    operation["operationId"] = json!(id);
                }
                paths
                    .entry(path)
                    .or_default()
                    .insert("post".into(), operation);
            }
        }
    }
    while let Some(name) = doc.pending.pop_first() {
        if doc.schemas.contains_key(&name) {
            continue;
        }
        if let Some(m) = transcoder.pool().get_message_by_name(&name) {
            let schema = doc.message_schema(&m);
            doc.schemas.insert(name, schema);
        } else if let Some(e) = transcoder.pool().get_enum_by_name(&name) {
            let schema = doc.enum_schema(&e);
            doc.schemas.insert(name, schema);
        }
    }
    doc.schemas.insert(
        "trellis.Error".into(),
        json!({
            "type": "object",
            "description": "The Trellis error model: the gRPC code's name, a stable UPPER_SNAKE reason, a message, and metadata such as the failing `field`.",
            "properties": {
                "code": {"type": "string", "examples": ["INVALID_ARGUMENT"]},
                "reason": {"type": "string", "examples": ["INVALID_FIELD"]},
                "message": {"type": "string"},
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}}
            },
            "required": ["code", "reason", "message"]
        }),
    );
    let title = services.iter().cloned().collect::<Vec<_>>().join(", ");
    let descriptions: Vec<String> = services
        .iter()
        .filter_map(|s| transcoder.pool().get_service_by_name(s))
        .filter_map(|s| {
            comments(&s.parent_file(), s.path()).map(|c| format!("**{}**: {c}", s.name()))
        })
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": { "title": title, "version": "v1", "description": descriptions.join("\n\n") },
        "paths": paths,
        "components": { "schemas": doc.schemas },
    })
}

struct Doc {
    schemas: BTreeMap<String, Json>,
    pending: BTreeSet<String>,
}

impl Doc {
    /// The OpenAPI path (`{name=users/*}` → `{name}`) and the operation.
    fn operation(&mut self, b: &Binding) -> (String, Json) {
        let rpc = &b.rpc;
        let input = rpc.input();
        let path = openapi_path(&b.template);
        let comment = comments(&rpc.parent_file(), rpc.path());
        let (summary, description) = match &comment {
            Some(c) => {
                let first = c.split("\n\n").next().unwrap_or(c).replace('\n', " ");
                (first, c.clone())
            }
            None => (rpc.name().to_owned(), String::new()),
        };
        let mut parameters = Vec::new();
        for field_path in &b.path_fields {
            if let Some(field) = resolve(&input, field_path) {
                let description = match field_comment(&field) {
                    Some(c) if field_path.contains('.') => format!("`{field_path}`: {c}"),
                    Some(c) => c,
                    None if field_path.contains('.') => format!("`{field_path}`"),
                    None => String::new(),
                };
                parameters.push(json!({
                    "name": parameter_name(field_path),
                    "in": "path",
                    "required": true,
                    "description": description,
                    "schema": self.field_schema(&field, false),
                }));
            }
        }
        let bound: BTreeSet<&str> = b.path_fields.iter().map(String::as_str).collect();
        if b.body.as_deref() != Some("*") {
            let mut query = Vec::new();
            query_fields(&input, "", &bound, b.body.as_deref(), 0, &mut query);
            for (name, field) in query {
                let (_, rules) = rule_keywords(&field);
                let schema = constrain(self.field_schema(&field, false), &field, rules);
                parameters.push(json!({
                    "name": name,
                    "in": "query",
                    "required": false,
                    "description": field_comment(&field).unwrap_or_default(),
                    "schema": schema,
                }));
            }
        }
        let mut op = json!({
            "operationId": format!("{}_{}", rpc.parent_service().name(), rpc.name()),
            "summary": summary,
            "tags": [rpc.parent_service().name()],
            "parameters": parameters,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": { "application/json": { "schema": self.response_schema(b) } }
                },
                "default": {
                    "description": "An error in the Trellis error model.",
                    "content": { "application/json": { "schema": { "$ref": "#/components/schemas/trellis.Error" } } }
                }
            }
        });
        if !description.is_empty() {
            op["description"] = json!(description);
        }
        if rpc.is_server_streaming() {
            op["responses"]["200"]["content"] = json!({
                "text/event-stream": { "schema": { "type": "string", "description": format!("Server-Sent Events, one `{}` as JSON per `data:` line; a final `event: error` carries an error.", rpc.output().full_name()) } },
                "application/x-ndjson": { "schema": self.message_ref(&rpc.output()) }
            });
        }
        match b.body.as_deref() {
            Some("*") => {
                op["requestBody"] = json!({
                    "required": true,
                    "content": { "application/json": { "schema": self.body_schema(&input, &bound) } }
                });
            }
            Some(name) => {
                if let Some(field) = input.get_field_by_name(name) {
                    op["requestBody"] = json!({
                        "required": true,
                        "description": field_comment(&field).unwrap_or_default(),
                        "content": { "application/json": { "schema": self.field_schema(&field, true) } }
                    });
                }
            }
            None => {}
        }
        (path, op)
    }

    fn response_schema(&mut self, b: &Binding) -> Json {
        let output = b.rpc.output();
        match b
            .response_body
            .as_deref()
            .and_then(|f| output.get_field_by_name(f))
        {
            Some(field) => self.field_schema(&field, true),
            None => self.message_ref(&output),
        }
    }

    /// The whole input minus the path-bound fields.
    fn body_schema(&mut self, input: &MessageDescriptor, bound: &BTreeSet<&str>) -> Json {
        if bound.is_empty() {
            return self.message_ref(input);
        }
        let mut schema = self.message_schema(input);
        if let Some(props) = schema.get_mut("properties").and_then(Json::as_object_mut) {
            for field in input.fields() {
                if bound.contains(field.name()) {
                    props.remove(field.json_name());
                }
            }
        }
        schema
    }

    fn message_ref(&mut self, m: &MessageDescriptor) -> Json {
        if let Some(wkt) = wkt_schema(m.full_name()) {
            return wkt;
        }
        self.pending.insert(m.full_name().to_owned());
        json!({ "$ref": format!("#/components/schemas/{}", m.full_name()) })
    }

    fn message_schema(&mut self, m: &MessageDescriptor) -> Json {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in m.fields() {
            let mut schema = self.field_schema(&field, true);
            let (must, constraints) = rule_keywords(&field);
            if must {
                required.push(json!(field.json_name()));
            }
            schema = constrain(schema, &field, constraints);
            if field_behaviors(&field).contains(&OUTPUT_ONLY) {
                schema = with(schema, "readOnly", json!(true));
            }
            if let Some(c) = field_comment(&field) {
                schema = with(schema, "description", json!(c));
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({ "type": "object", "properties": properties });
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
        if let Some(c) = comments(&m.parent_file(), m.path()) {
            schema["description"] = json!(c);
        }
        schema
    }

    fn enum_schema(&mut self, e: &EnumDescriptor) -> Json {
        let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
        let mut schema = json!({ "type": "string", "enum": names });
        if let Some(c) = comments(&e.parent_file(), e.path()) {
            schema["description"] = json!(c);
        }
        schema
    }

    /// A field's schema in the proto3 JSON mapping.
    fn field_schema(&mut self, field: &FieldDescriptor, in_body: bool) -> Json {
        let single = match field.kind() {
            Kind::Double => json!({ "type": "number", "format": "double" }),
            Kind::Float => json!({ "type": "number", "format": "float" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({ "type": "integer", "format": "int32" })
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({ "type": "integer", "format": "uint32", "minimum": 0 })
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({ "type": "string", "format": "int64" })
            }
            Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64" }),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
            Kind::Enum(e) => {
                self.pending.insert(e.full_name().to_owned());
                json!({ "$ref": format!("#/components/schemas/{}", e.full_name()) })
            }
            Kind::Message(m) if field.is_map() => {
                let value = m.map_entry_value_field();
                return json!({ "type": "object", "additionalProperties": self.field_schema(&value, in_body) });
            }
            Kind::Message(m) => self.message_ref(&m),
        };
        // In the query, a repeated field is the parameter given again: `?tag=a&tag=b`.
        let _ = in_body;
        if field.is_list() {
            json!({ "type": "array", "items": single })
        } else {
            single
        }
    }
}

fn with(mut schema: Json, key: &str, value: Json) -> Json {
    if schema.get("$ref").is_some() {
        // Siblings of $ref are allowed in 3.1, but keep it explicit.
        return json!({ "allOf": [schema], key: value });
    }
    schema[key] = value;
    schema
}

/// The JSON schema of a well-known type, which has its own JSON form.
fn wkt_schema(name: &str) -> Option<Json> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "google.protobuf.Duration" => {
            json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "examples": ["1.5s"] })
        }
        "google.protobuf.FieldMask" => {
            json!({ "type": "string", "description": "Comma-separated field paths, e.g. `email,displayName`." })
        }
        "google.protobuf.Empty" => json!({ "type": "object" }),
        "google.protobuf.Struct" => json!({ "type": "object", "additionalProperties": true }),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({ "type": "array", "items": {} }),
        "google.protobuf.Any" => {
            json!({ "type": "object", "properties": { "@type": { "type": "string" } }, "required": ["@type"], "additionalProperties": true })
        }
        "google.protobuf.StringValue" => json!({ "type": ["string", "null"] }),
        "google.protobuf.BytesValue" => {
            json!({ "type": ["string", "null"], "contentEncoding": "base64" })
        }
        "google.protobuf.BoolValue" => json!({ "type": ["boolean", "null"] }),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({ "type": ["integer", "null"] })
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({ "type": ["string", "null"], "format": "int64" })
        }
        "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => {
            json!({ "type": ["number", "null"] })
        }
        _ => return None,
    })
}

/// The query parameters of a route: scalar leaves not bound by the path or
/// the body, as dotted paths (nested messages to a few levels).
fn query_fields(
    m: &MessageDescriptor,
    prefix: &str,
    bound: &BTreeSet<&str>,
    body: Option<&str>,
    depth: usize,
    out: &mut Vec<(String, FieldDescriptor)>,
) {
    for field in m.fields() {
        let name = if prefix.is_empty() {
            field.name().to_owned()
        } else {
            format!("{prefix}.{}", field.name())
        };
        if bound.contains(name.as_str())
            || (depth == 0 && body == Some(field.name()))
            || field.is_map()
        {
            continue;
        }
        match field.kind() {
            Kind::Message(inner)
                if wkt_schema(inner.full_name()).is_none()
                    || inner.full_name() == "google.protobuf.Empty" =>
            {
                if depth < 3 && !field.is_list() {
                    query_fields(&inner, &name, bound, body, depth + 1, out);
                }
            }
            _ => out.push((name, field)),
        }
    }
}

fn resolve(m: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut current = m.clone();
    let mut found = None;
    for part in path.split('.') {
        let f = current.get_field_by_name(part)?;
        if let Kind::Message(inner) = f.kind() {
            current = inner;
        }
        found = Some(f);
    }
    found
}

/// `/v1/{name=users/*}:undelete` → `/v1/{name}:undelete`, and
/// `{user.id}` → `{user_id}`: dotted parameter names are legal OpenAPI but
/// break common tooling (anything built on Python's `str.format`).
fn openapi_path(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let (mut inside, mut skipping) = (false, false);
    for c in template.chars() {
        match c {
            '{' => {
                inside = true;
                out.push('{');
            }
            '=' if inside => skipping = true,
            '}' => {
                (inside, skipping) = (false, false);
                out.push('}');
            }
            _ if skipping => {}
            '.' if inside => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

/// A path parameter's name in the document (see [`openapi_path`]).
fn parameter_name(field_path: &str) -> String {
    field_path.replace('.', "_")
}

/// A field's request rules (read by [`crate::annotations`], the reader
/// validation uses too): whether it is required, and its rules as JSON
/// Schema keywords (what the JSON form can express).
fn rule_keywords(field: &FieldDescriptor) -> (bool, Map<String, Json>) {
    let mut out = Map::new();
    // A rule that does not compile fails the transcoder's build first.
    let rules = field_rules(field).unwrap_or_default();
    let string = field.kind() == Kind::String;
    // 64-bit integers are strings in JSON: numeric bounds do not apply there.
    let numeric_json = matches!(
        field.kind(),
        Kind::Int32
            | Kind::Uint32
            | Kind::Float
            | Kind::Double
            | Kind::Sint32
            | Kind::Fixed32
            | Kind::Sfixed32
    );
    for rule in &rules.rules {
        let (key, value) = match rule {
            Rule::MinLen(n) if string => ("minLength", json!(n)),
            Rule::MaxLen(n) if string => ("maxLength", json!(n)),
            Rule::Len(n) if string => {
                out.insert("minLength".into(), json!(n));
                ("maxLength", json!(n))
            }
            Rule::Pattern(re) => ("pattern", json!(re.as_str())),
            Rule::StrConst(c) => ("const", json!(c)),
            Rule::StrIn(set) => ("enum", json!(set)),
            Rule::MinItems(n) => ("minItems", json!(n)),
            Rule::MaxItems(n) => ("maxItems", json!(n)),
            Rule::Unique => ("uniqueItems", json!(true)),
            Rule::Gt(n) if numeric_json => ("exclusiveMinimum", n.to_json()),
            Rule::Gte(n) if numeric_json => ("minimum", n.to_json()),
            Rule::Lt(n) if numeric_json => ("exclusiveMaximum", n.to_json()),
            Rule::Lte(n) if numeric_json => ("maximum", n.to_json()),
            _ => continue,
        };
        out.insert(key.into(), value);
    }
    (rules.required, out)
}

/// Adds rule keywords to a field's schema: on the items of a list for
/// item rules, on the list for list rules.
fn constrain(mut schema: Json, field: &FieldDescriptor, constraints: Map<String, Json>) -> Json {
    if constraints.is_empty() {
        return schema;
    }
    for (key, value) in constraints {
        let on_list = matches!(key.as_str(), "minItems" | "maxItems" | "uniqueItems");
        if field.is_list() && !on_list {
            if let Some(items) = schema.get_mut("items") {
                items[key.as_str()] = value;
            }
        } else if schema.get("$ref").is_some() {
            schema = with(schema, &key, value);
        } else {
            schema[key.as_str()] = value;
        }
    }
    schema
}

fn field_comment(field: &FieldDescriptor) -> Option<String> {
    comments(&field.parent_file(), field.path())
}

/// The leading comment of the element at `path` in `file`, tidied.
fn comments(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect();
    let joined = lines.join("\n").trim().to_owned();
    if joined.is_empty() {
        None
    } else {
        Some(joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_patterns_become_plain_parameters() {
        assert_eq!(openapi_path("/v1/{name=users/*}"), "/v1/{name}");
        assert_eq!(openapi_path("/v1/users/{user.id}"), "/v1/users/{user_id}");
        assert_eq!(
            openapi_path("/v1/{name=shops/*/items/*}:undelete"),
            "/v1/{name}:undelete"
        );
    }
}
