//! The request stage: from an HTTP request to the gRPC request message —
//! the body read within its limit and checked for its content type, then
//! the body, the query string and the path variables, each overriding what
//! came before (the `google.api.http` rules).

use std::collections::HashSet;

use bytes::Bytes;
use http::{HeaderMap, header};
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use tower::BoxError;
use trellis_core::{Code, Error, excerpt};

use crate::{
    TranscodeOptions,
    service::{BodyRule, Route},
    template::PathVars,
};

/// Reads the request body up to `max` bytes. A declared `Content-Length`
/// over the limit is refused before anything is read; a body that turns
/// out longer is cut off as soon as it passes the limit. Both are 413
/// naming the limit.
pub(crate) async fn read_body<B>(headers: &HeaderMap, body: B, max: usize) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        Error::new(
            Code::ResourceExhausted,
            "BODY_TOO_LARGE",
            format!("the request body is over the {max}-byte limit"),
        )
        .with_metadata("limit_bytes", max.to_string())
    };
    if let Some(declared) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && declared > max as u64
    {
        return Err(too_large());
    }
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max)).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Error::new(
            Code::InvalidArgument,
            "BODY_UNREADABLE",
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// A body is JSON: `application/json` or a `+json` type (parameters such as
/// `charset=utf-8` allowed). Anything else is refused with 415, so a
/// cross-site form post (`text/plain`, which a browser sends without a
/// preflight) can never write.
pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let unsupported = |shown: String| {
        Error::new(
            Code::InvalidArgument,
            "UNSUPPORTED_MEDIA_TYPE",
            format!("the body must be application/json, not {shown}"),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("a body without a content type".into()));
    };
    let text = value
        .to_str()
        .map_err(|_| unsupported("an unreadable content type".into()))?;
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || essence
            .split_once('/')
            .is_some_and(|(kind, sub)| kind == "application" && sub.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(unsupported(excerpt(text)))
    }
}

/// The request message: the body first, then the query string, then the
/// path variables, each overriding what came before.
pub(crate) fn request_message(
    options: &TranscodeOptions,
    route: &Route,
    vars: &PathVars,
    query: &str,
    body: &[u8],
) -> Result<DynamicMessage, Error> {
    let input = route.rpc.input();
    let mut message = DynamicMessage::new(input.clone());
    let mut body_keys = Vec::new();
    let empty = body.iter().all(u8::is_ascii_whitespace);
    match &route.body {
        BodyRule::None => {
            if !empty {
                return Err(Error::new(
                    Code::InvalidArgument,
                    "UNEXPECTED_BODY",
                    format!("{} {} takes no body", route.method, route.template.source()),
                ));
            }
        }
        BodyRule::Whole => {
            if !empty {
                message = parse_json(options, &input, body)?;
            }
        }
        BodyRule::Field(field) => {
            if !empty {
                let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
                    Error::invalid_argument(
                        field.json_name(),
                        format!("the body is not JSON: {}", strip_position(&e.to_string())),
                    )
                })?;
                if let serde_json::Value::Object(map) = &value {
                    body_keys = map.keys().cloned().collect();
                }
                let wrapped = serde_json::json!({ field.json_name(): value });
                let bytes =
                    serde_json::to_vec(&wrapped).map_err(|e| Error::internal(e.to_string()))?;
                message = parse_json(options, &input, &bytes)?;
            }
        }
    }

    let bound: HashSet<&str> = vars.iter().map(|(f, _)| &**f).collect();
    let mut from_query = HashSet::new();
    for (key, value) in query_pairs(query)? {
        if matches!(route.body, BodyRule::Whole) {
            return Err(Error::invalid_argument(
                key,
                "this route takes every field from the body",
            ));
        }
        if bound.contains(key.as_str()) {
            return Err(Error::invalid_argument(
                key,
                "this field is taken from the path",
            ));
        }
        let field = match field_path(&input, &key) {
            Ok(f) => f,
            Err(_) if options.allow_unknown_fields => continue,
            Err(e) => {
                return Err(Error::invalid_argument(
                    key,
                    format!("unknown query parameter: {e}"),
                ));
            }
        };
        if let BodyRule::Field(body) = &route.body
            && key
                .split('.')
                .next()
                .is_some_and(|top| top == body.name() || top == body.json_name())
        {
            return Err(Error::invalid_argument(
                key,
                "this field is taken from the body",
            ));
        }
        if field.is_map() || matches!(field.kind(), Kind::Message(_)) && !is_scalar_wkt(&field) {
            return Err(Error::invalid_argument(
                key,
                "only scalar fields can come from the query",
            ));
        }
        set_path(options, &mut message, &key, &field, &value)?;
        from_query.insert(field.full_name().to_owned());
    }
    for (path, value) in vars {
        let field = field_path(&input, path).map_err(Error::internal)?;
        set_path(options, &mut message, path, &field, value)?;
    }

    // PATCH with a FieldMask left empty: the fields the body named.
    if let BodyRule::Field(body_field) = &route.body
        && let Kind::Message(body_type) = body_field.kind()
        && !body_keys.is_empty()
    {
        for mask in input.fields() {
            let is_mask = matches!(mask.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask");
            if is_mask && !message.has_field(&mask) && !from_query.contains(mask.full_name()) {
                let paths: Vec<Value> = body_keys
                    .iter()
                    .filter_map(|k| {
                        body_type
                            .get_field_by_json_name(k)
                            .or_else(|| body_type.get_field_by_name(k))
                    })
                    .map(|f| Value::String(f.name().to_owned()))
                    .collect();
                if let Kind::Message(mask_type) = mask.kind() {
                    let mut value = DynamicMessage::new(mask_type);
                    value.set_field_by_name("paths", Value::List(paths));
                    message.set_field(&mask, Value::Message(value));
                }
            }
        }
    }
    Ok(message)
}

/// The query string as decoded pairs (`+` is a space). A parameter whose
/// name or value is not percent-encoded UTF-8 is refused, naming it, rather
/// than passed on with replacement characters.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |text: &str| {
            form_decode(text).ok_or_else(|| {
                Error::new(
                    Code::InvalidArgument,
                    "BAD_QUERY",
                    format!(
                        "the query parameter {} is not percent-encoded UTF-8",
                        excerpt(pair)
                    ),
                )
            })
        };
        pairs.push((decode(key)?, decode(value)?));
    }
    Ok(pairs)
}

/// `application/x-www-form-urlencoded` decoding, strict: `None` for a bad
/// escape or bytes that are not UTF-8.
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A message from JSON, the error naming the field path at fault.
pub(crate) fn parse_json(
    options: &TranscodeOptions,
    desc: &MessageDescriptor,
    json: &[u8],
) -> Result<DynamicMessage, Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let mut track = serde_path_to_error::Track::new();
    let deserialize = DeserializeOptions::new().deny_unknown_fields(!options.allow_unknown_fields);
    let parsed = DynamicMessage::deserialize_with_options(
        desc.clone(),
        serde_path_to_error::Deserializer::new(&mut de, &mut track),
        &deserialize,
    )
    .and_then(|m| de.end().map(|()| m));
    parsed.map_err(|e| {
        let message = strip_position(&e.to_string());
        let mut field = match track.path().to_string().as_str() {
            "." | "" | "?" => String::new(),
            path => path.to_owned(),
        };
        // An unknown field is reported at its parent; name it.
        if let Some(name) = message
            .strip_prefix("unrecognized field name '")
            .and_then(|r| r.split('\'').next())
        {
            field = if field.is_empty() {
                name.to_owned()
            } else {
                format!("{field}.{name}")
            };
        }
        let field = if field.is_empty() {
            "(body)".to_owned()
        } else {
            field
        };
        Error::invalid_argument(field, format!("invalid JSON: {message}"))
    })
}

/// Sets the field at `path` from a text value (a path segment or query
/// parameter), parsed by the field's JSON mapping; repeated fields append.
fn set_path(
    options: &TranscodeOptions,
    message: &mut DynamicMessage,
    path: &str,
    field: &FieldDescriptor,
    text: &str,
) -> Result<(), Error> {
    // The common case, a top-level string (`/v1/users/{id}`), directly.
    if !path.contains('.') && !field.is_list() && field.kind() == Kind::String {
        message.set_field(field, Value::String(text.to_owned()));
        return Ok(());
    }
    let leaf = match field.kind() {
        Kind::Bool => match text {
            "true" => serde_json::Value::Bool(true),
            "false" => serde_json::Value::Bool(false),
            _ => {
                return Err(Error::invalid_argument(
                    path,
                    format!("{} is not true or false", excerpt(text)),
                ));
            }
        },
        Kind::Enum(_) => match text.parse::<i32>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) => serde_json::Value::String(text.to_owned()),
        },
        _ => serde_json::Value::String(text.to_owned()),
    };
    let leaf = if field.is_list() {
        serde_json::Value::Array(vec![leaf])
    } else {
        leaf
    };
    // Wrap the value in its parents: {"user": {"id": "7"}}.
    let input = prost_reflect::ReflectMessage::descriptor(message);
    let mut names = Vec::new();
    let mut current = input.clone();
    for part in path.split('.') {
        let f = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))
            .ok_or_else(|| Error::invalid_argument(path, "no such field"))?;
        names.push(f.json_name().to_owned());
        if let Kind::Message(m) = f.kind() {
            current = m;
        }
    }
    let json = names
        .iter()
        .rev()
        .fold(leaf, |inner, name| serde_json::json!({ name: inner }));
    let bytes = serde_json::to_vec(&json).map_err(|e| Error::internal(e.to_string()))?;
    let part = parse_json(options, &input, &bytes).map_err(|e| {
        Error::invalid_argument(
            path,
            e.message().trim_start_matches("invalid JSON: ").to_owned(),
        )
    })?;
    // Protobuf merge: scalars overwrite, repeated fields append.
    prost::Message::merge(message, prost::Message::encode_to_vec(&part).as_slice())
        .map_err(|e| Error::internal(e.to_string()))?;
    Ok(())
}

/// Resolves a dotted path of field names (proto or JSON names).
pub(crate) fn field_path(
    message: &MessageDescriptor,
    path: &str,
) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))
            .ok_or_else(|| format!("no field {} in {}", excerpt(part), current.full_name()))?;
        if parts.peek().is_none() {
            return Ok(field);
        }
        match field.kind() {
            Kind::Message(m) if !field.is_list() && !field.is_map() => current = m,
            _ => return Err(format!("{part} is not a message field")),
        }
    }
    Err("empty field path".into())
}

/// Well-known types whose JSON form is a string or number, so they can come
/// from a path segment or a query parameter.
pub(crate) fn is_scalar_wkt(field: &FieldDescriptor) -> bool {
    match field.kind() {
        Kind::Message(m) => matches!(
            m.full_name(),
            "google.protobuf.Timestamp"
                | "google.protobuf.Duration"
                | "google.protobuf.FieldMask"
                | "google.protobuf.StringValue"
                | "google.protobuf.BytesValue"
                | "google.protobuf.BoolValue"
                | "google.protobuf.Int32Value"
                | "google.protobuf.Int64Value"
                | "google.protobuf.UInt32Value"
                | "google.protobuf.UInt64Value"
                | "google.protobuf.FloatValue"
                | "google.protobuf.DoubleValue"
        ),
        _ => true,
    }
}

/// serde_json's " at line 1 column 17" means nothing to a REST caller.
pub(crate) fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_owned(),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_strictly() {
        assert_eq!(
            query_pairs("a=1&b=x+y&c=%C3%A9&d").unwrap(),
            [
                ("a".to_owned(), "1".to_owned()),
                ("b".into(), "x y".into()),
                ("c".into(), "é".into()),
                ("d".into(), String::new())
            ]
        );
        for bad in ["a=%FF", "%C3=1", "a=%zz", "a=%4"] {
            let err = query_pairs(bad).unwrap_err();
            assert_eq!(err.reason(), "BAD_QUERY", "{bad}");
        }
    }

    #[test]
    fn only_json_bodies_are_read() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            check_content_type(&h)
        };
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "text/json+html",
        ] {
            assert_eq!(
                with(bad).unwrap_err().reason(),
                "UNSUPPORTED_MEDIA_TYPE",
                "{bad}"
            );
        }
        assert!(check_content_type(&HeaderMap::new()).is_err());
    }
}
