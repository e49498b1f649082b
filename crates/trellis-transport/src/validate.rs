//! Request validation from the proto: `google.api.field_behavior = REQUIRED`
//! and a subset of protovalidate's `buf.validate.field` rules, read from the
//! descriptors once and checked on every request, on both faces (the
//! transcoder checks REST requests; [`ValidateLayer`] checks gRPC ones).
//!
//! | rule | applies to |
//! |---|---|
//! | `(google.api.field_behavior) = REQUIRED`, `(buf.validate.field).required` | any field: non-default scalar, present message, non-empty list |
//! | `string`: `const`, `len`, `min_len`, `max_len` (characters), `min_bytes`, `max_bytes`, `pattern`, `prefix`, `suffix`, `contains`, `in`, `not_in` | strings |
//! | `bytes`: `len`, `min_len`, `max_len` | bytes |
//! | `int32`, `int64`, `uint32`, `uint64`, `float`, `double`: `const`, `lt`, `lte`, `gt`, `gte`, `in`, `not_in` | numbers |
//! | `enum`: `const`, `defined_only`, `in`, `not_in` | enums |
//! | `repeated`: `min_items`, `max_items`, `unique` | lists |
//!
//! Rules on a repeated scalar field apply to each item. Nested messages are
//! checked wherever they appear. A violation names the field by its proto
//! path (`user.display_name`, `items[2].sku`); all of a request's
//! violations come back together as one INVALID_ARGUMENT.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{body::Body, response::IntoResponse};
use bytes::{Buf, Bytes};
use http::{Request, Response};
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use tower::{Layer, Service};
use trellis_core::{Code, Error};

/// A number from a rule or a field, compared exactly for integers.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
enum Num {
    I(i128),
    F(f64),
}

impl Num {
    fn of(v: &Value) -> Option<Num> {
        Some(match v {
            Value::I32(n) => Num::I(i128::from(*n)),
            Value::I64(n) => Num::I(i128::from(*n)),
            Value::U32(n) => Num::I(i128::from(*n)),
            Value::U64(n) => Num::I(i128::from(*n)),
            Value::F32(n) => Num::F(f64::from(*n)),
            Value::F64(n) => Num::F(*n),
            Value::EnumNumber(n) => Num::I(i128::from(*n)),
            _ => return None,
        })
    }

    fn cmp(self, other: Num) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Num::I(a), Num::I(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::I(n) => n as f64,
            Num::F(f) => f,
        }
    }

    fn show(self) -> String {
        match self {
            Num::I(n) => n.to_string(),
            Num::F(f) => f.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
enum Rule {
    StrConst(String),
    Len(u64),
    MinLen(u64),
    MaxLen(u64),
    MinBytes(u64),
    MaxBytes(u64),
    Pattern(regex::Regex),
    Prefix(String),
    Suffix(String),
    Contains(String),
    StrIn(Vec<String>),
    StrNotIn(Vec<String>),
    NumConst(Num),
    Lt(Num),
    Lte(Num),
    Gt(Num),
    Gte(Num),
    NumIn(Vec<Num>),
    NumNotIn(Vec<Num>),
    DefinedOnly,
    MinItems(u64),
    MaxItems(u64),
    Unique,
}

#[derive(Debug, Clone)]
struct Check {
    field: FieldDescriptor,
    required: bool,
    rules: Vec<Rule>,
}

/// The rules of every message in a descriptor pool.
#[derive(Debug, Clone)]
pub struct Validator {
    /// Message full name → its fields' checks (only fields with any).
    checks: Arc<HashMap<String, Vec<Check>>>,
    /// Messages with checks of their own or in a nested message.
    needed: Arc<HashSet<String>>,
}

/// A rule that could not be read (an invalid `pattern`).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    /// The field the rule is on.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Validator {
    /// Reads the rules of every message in `pool`.
    pub fn new(pool: &DescriptorPool) -> Result<Validator, RuleError> {
        let behavior = pool.get_extension_by_name("google.api.field_behavior");
        let buf = pool.get_extension_by_name("buf.validate.field");
        let mut checks = HashMap::new();
        for message in pool.all_messages() {
            let mut list = Vec::new();
            for field in message.fields() {
                let options = field.options();
                let mut required = false;
                if let Some(ext) = &behavior
                    && options.has_extension(ext)
                {
                    required = match options.get_extension(ext).as_ref() {
                        Value::List(values) => values.iter().any(|v| v.as_enum_number() == Some(2)),
                        other => other.as_enum_number() == Some(2),
                    };
                }
                let mut rules = Vec::new();
                if let Some(ext) = &buf
                    && options.has_extension(ext)
                    && let Value::Message(field_rules) = options.get_extension(ext).as_ref()
                {
                    required |= field_rules
                        .get_field_by_name("required")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false);
                    rules = read_rules(field_rules).map_err(|message| RuleError {
                        field: field.full_name().to_owned(),
                        message,
                    })?;
                }
                if required || !rules.is_empty() {
                    list.push(Check {
                        field,
                        required,
                        rules,
                    });
                }
            }
            if !list.is_empty() {
                checks.insert(message.full_name().to_owned(), list);
            }
        }
        // Which messages need a look, directly or through a nested message.
        let mut needed: HashSet<String> = checks.keys().cloned().collect();
        loop {
            let before = needed.len();
            for message in pool.all_messages() {
                if needed.contains(message.full_name()) {
                    continue;
                }
                let nested = message.fields().any(|f| match f.kind() {
                    Kind::Message(m) => needed.contains(m.full_name()),
                    _ => false,
                });
                if nested {
                    needed.insert(message.full_name().to_owned());
                }
            }
            if needed.len() == before {
                break;
            }
        }
        Ok(Validator {
            checks: Arc::new(checks),
            needed: Arc::new(needed),
        })
    }

    /// Whether messages of this type have anything to check.
    pub fn applies_to(&self, message: &MessageDescriptor) -> bool {
        self.needed.contains(message.full_name())
    }

    /// Every violation in `message`, as (field path, what is wrong).
    pub fn violations(&self, message: &DynamicMessage) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.visit(message, "", &mut out);
        out
    }

    /// `Ok` or one INVALID_ARGUMENT naming every failing field.
    pub fn check(&self, message: &DynamicMessage) -> Result<(), Error> {
        report(self.violations(message))
    }

    /// For a message whose only rules are top-level `REQUIRED` fields: their
    /// numbers, names and whether they are messages (present when sent at
    /// all) — checkable on the wire without decoding. `None` otherwise.
    fn presence_only(&self, message: &MessageDescriptor) -> Option<Vec<(u32, String, bool)>> {
        let checks = self.checks.get(message.full_name())?;
        if checks.iter().any(|c| !c.rules.is_empty() || !c.required) {
            return None;
        }
        let nested = message
            .fields()
            .any(|f| matches!(f.kind(), Kind::Message(m) if self.needed.contains(m.full_name())));
        if nested {
            return None;
        }
        Some(
            checks
                .iter()
                .map(|c| {
                    let is_message = matches!(c.field.kind(), Kind::Message(_))
                        || c.field.is_list()
                        || c.field.is_map();
                    (c.field.number(), c.field.name().to_owned(), is_message)
                })
                .collect(),
        )
    }

    fn visit(&self, message: &DynamicMessage, prefix: &str, out: &mut Vec<(String, String)>) {
        let desc = prost_reflect::ReflectMessage::descriptor(message);
        if !self.needed.contains(desc.full_name()) {
            return;
        }
        let path = |f: &FieldDescriptor| {
            if prefix.is_empty() {
                f.name().to_owned()
            } else {
                format!("{prefix}.{}", f.name())
            }
        };
        if let Some(checks) = self.checks.get(desc.full_name()) {
            for check in checks {
                let field = &check.field;
                let present = message.has_field(field);
                let value = message.get_field(field);
                let empty = match value.as_ref() {
                    Value::List(l) => l.is_empty(),
                    Value::Map(m) => m.is_empty(),
                    _ => !present,
                };
                if check.required && empty {
                    out.push((path(field), "is required".into()));
                    continue;
                }
                match value.as_ref() {
                    Value::List(items) => {
                        for rule in &check.rules {
                            if let Some(why) = list_rule(rule, items) {
                                out.push((path(field), why));
                            }
                        }
                        for (i, item) in items.iter().enumerate() {
                            for rule in &check.rules {
                                if let Some(why) = value_rule(rule, item, field) {
                                    out.push((format!("{}[{i}]", path(field)), why));
                                }
                            }
                        }
                    }
                    // Rules check a value that is there; "is there" is `required`.
                    v if present || !field.supports_presence() => {
                        for rule in &check.rules {
                            if let Some(why) = value_rule(rule, v, field) {
                                out.push((path(field), why));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        for field in desc.fields() {
            let Kind::Message(m) = field.kind() else {
                continue;
            };
            if !self.needed.contains(m.full_name()) || !message.has_field(&field) {
                continue;
            }
            match message.get_field(&field).as_ref() {
                Value::Message(inner) => self.visit(inner, &path(&field), out),
                Value::List(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Value::Message(inner) = item {
                            self.visit(inner, &format!("{}[{i}]", path(&field)), out);
                        }
                    }
                }
                Value::Map(entries) => {
                    for (key, item) in entries {
                        if let Value::Message(inner) = item {
                            let key = match key {
                                prost_reflect::MapKey::String(s) => s.clone(),
                                other => format!("{other:?}"),
                            };
                            self.visit(inner, &format!("{}[{key}]", path(&field)), out);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// `Ok` for no violations, else one INVALID_ARGUMENT naming every failing
/// field: `INVALID_FIELD` for one, `INVALID_FIELDS` for several.
fn report(violations: Vec<(String, String)>) -> Result<(), Error> {
    if violations.is_empty() {
        return Ok(());
    }
    // One entry per field, its complaints together, in field order.
    let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
    for (field, why) in violations {
        match grouped.iter_mut().find(|(f, _)| *f == field) {
            Some((_, whys)) => whys.push(why),
            None => grouped.push((field, vec![why])),
        }
    }
    let text: Vec<String> = grouped
        .iter()
        .map(|(f, w)| format!("{f}: {}", w.join(", ")))
        .collect();
    if let [(field, _)] = grouped.as_slice() {
        return Err(Error::invalid_argument(field.clone(), text.join("")));
    }
    let fields: Vec<&str> = grouped.iter().map(|(f, _)| f.as_str()).collect();
    let mut error = Error::new(Code::InvalidArgument, "INVALID_FIELDS", text.join("; "))
        .with_metadata("field", grouped[0].0.clone())
        .with_metadata("fields", fields.join(","));
    for (f, w) in &grouped {
        error = error.with_metadata(format!("violation.{f}"), w.join(", "));
    }
    Err(error)
}

/// The field numbers of a protobuf message's top-level fields: every one
/// sent, and the ones sent with a non-default value. `None` for input that
/// is not well-formed (left to the service to reject).
fn wire_fields(mut b: &[u8]) -> Option<(Vec<u32>, Vec<u32>)> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let (mut sent, mut set) = (Vec::new(), Vec::new());
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let number = u32::try_from(key >> 3).ok()?;
        let nonzero = match key & 7 {
            0 => varint(&mut b)? != 0,
            1 => {
                let (v, rest) = b.split_at_checked(8)?;
                b = rest;
                v.iter().any(|x| *x != 0)
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let (v, rest) = b.split_at_checked(len)?;
                b = rest;
                !v.is_empty()
            }
            5 => {
                let (v, rest) = b.split_at_checked(4)?;
                b = rest;
                v.iter().any(|x| *x != 0)
            }
            _ => return None,
        };
        sent.push(number);
        if nonzero {
            set.push(number);
        }
    }
    Some((sent, set))
}

fn read_rules(field_rules: &DynamicMessage) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (kind, value) in field_rules.fields() {
        let Value::Message(typed) = value else {
            continue;
        };
        match kind.name() {
            "string" => {
                for (f, v) in typed.fields() {
                    let n = || v.as_u64().unwrap_or(0);
                    let s = || v.as_str().unwrap_or("").to_owned();
                    let list = || {
                        v.as_list()
                            .map(|l| {
                                l.iter()
                                    .filter_map(|x| x.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    rules.push(match f.name() {
                        "const" => Rule::StrConst(s()),
                        "len" => Rule::Len(n()),
                        "min_len" => Rule::MinLen(n()),
                        "max_len" => Rule::MaxLen(n()),
                        "min_bytes" => Rule::MinBytes(n()),
                        "max_bytes" => Rule::MaxBytes(n()),
                        "pattern" => Rule::Pattern(
                            regex::Regex::new(&s()).map_err(|e| format!("pattern: {e}"))?,
                        ),
                        "prefix" => Rule::Prefix(s()),
                        "suffix" => Rule::Suffix(s()),
                        "contains" => Rule::Contains(s()),
                        "in" => Rule::StrIn(list()),
                        "not_in" => Rule::StrNotIn(list()),
                        _ => continue,
                    });
                }
            }
            "bytes" => {
                for (f, v) in typed.fields() {
                    let n = v.as_u64().unwrap_or(0);
                    rules.push(match f.name() {
                        "len" => Rule::Len(n),
                        "min_len" => Rule::MinLen(n),
                        "max_len" => Rule::MaxLen(n),
                        _ => continue,
                    });
                }
            }
            "int32" | "int64" | "uint32" | "uint64" | "float" | "double" | "sint32" | "sint64"
            | "fixed32" | "fixed64" | "sfixed32" | "sfixed64" | "enum" => {
                for (f, v) in typed.fields() {
                    let list = || {
                        v.as_list()
                            .map(|l| l.iter().filter_map(Num::of).collect())
                            .unwrap_or_default()
                    };
                    rules.push(match (f.name(), Num::of(v)) {
                        ("const", Some(n)) => Rule::NumConst(n),
                        ("lt", Some(n)) => Rule::Lt(n),
                        ("lte", Some(n)) => Rule::Lte(n),
                        ("gt", Some(n)) => Rule::Gt(n),
                        ("gte", Some(n)) => Rule::Gte(n),
                        ("in", _) => Rule::NumIn(list()),
                        ("not_in", _) => Rule::NumNotIn(list()),
                        ("defined_only", _) if v.as_bool() == Some(true) => Rule::DefinedOnly,
                        _ => continue,
                    });
                }
            }
            "repeated" => {
                for (f, v) in typed.fields() {
                    rules.push(match f.name() {
                        "min_items" => Rule::MinItems(v.as_u64().unwrap_or(0)),
                        "max_items" => Rule::MaxItems(v.as_u64().unwrap_or(u64::MAX)),
                        "unique" if v.as_bool() == Some(true) => Rule::Unique,
                        _ => continue,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(rules)
}

fn list_rule(rule: &Rule, items: &[Value]) -> Option<String> {
    let n = items.len() as u64;
    match rule {
        Rule::MinItems(min) if n < *min => Some(format!("must have at least {min} items")),
        Rule::MaxItems(max) if n > *max => Some(format!("must have at most {max} items")),
        Rule::Unique => {
            let mut seen = Vec::with_capacity(items.len());
            for item in items {
                if seen.contains(&item) {
                    return Some("must not repeat items".into());
                }
                seen.push(item);
            }
            None
        }
        _ => None,
    }
}

fn value_rule(rule: &Rule, value: &Value, field: &FieldDescriptor) -> Option<String> {
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        return match rule {
            Rule::StrConst(c) if s != c => Some(format!("must be {c:?}")),
            Rule::Len(n) if chars != *n => Some(format!("must be {n} characters long")),
            Rule::MinLen(n) if chars < *n => Some(format!("must be at least {n} characters long")),
            Rule::MaxLen(n) if chars > *n => Some(format!("must be at most {n} characters long")),
            Rule::MinBytes(n) if (s.len() as u64) < *n => {
                Some(format!("must be at least {n} bytes long"))
            }
            Rule::MaxBytes(n) if (s.len() as u64) > *n => {
                Some(format!("must be at most {n} bytes long"))
            }
            Rule::Pattern(re) if !re.is_match(s) => Some(format!("must match {}", re.as_str())),
            Rule::Prefix(p) if !s.starts_with(p.as_str()) => Some(format!("must start with {p:?}")),
            Rule::Suffix(p) if !s.ends_with(p.as_str()) => Some(format!("must end with {p:?}")),
            Rule::Contains(p) if !s.contains(p.as_str()) => Some(format!("must contain {p:?}")),
            Rule::StrIn(set) if !set.iter().any(|x| x == s) => {
                Some(format!("must be one of {set:?}"))
            }
            Rule::StrNotIn(set) if set.iter().any(|x| x == s) => {
                Some(format!("must not be one of {set:?}"))
            }
            _ => None,
        };
    }
    if let Some(b) = value.as_bytes() {
        let n = b.len() as u64;
        return match rule {
            Rule::Len(len) if n != *len => Some(format!("must be {len} bytes long")),
            Rule::MinLen(min) if n < *min => Some(format!("must be at least {min} bytes long")),
            Rule::MaxLen(max) if n > *max => Some(format!("must be at most {max} bytes long")),
            _ => None,
        };
    }
    let n = Num::of(value)?;
    use std::cmp::Ordering::*;
    match rule {
        Rule::NumConst(c) if n.cmp(*c) != Some(Equal) => Some(format!("must be {}", c.show())),
        Rule::Lt(b) if n.cmp(*b) != Some(Less) => Some(format!("must be less than {}", b.show())),
        Rule::Lte(b) if !matches!(n.cmp(*b), Some(Less | Equal)) => {
            Some(format!("must be at most {}", b.show()))
        }
        Rule::Gt(b) if n.cmp(*b) != Some(Greater) => {
            Some(format!("must be greater than {}", b.show()))
        }
        Rule::Gte(b) if !matches!(n.cmp(*b), Some(Greater | Equal)) => {
            Some(format!("must be at least {}", b.show()))
        }
        Rule::NumIn(set) if !set.iter().any(|x| n.cmp(*x) == Some(Equal)) => Some(format!(
            "must be one of {:?}",
            set.iter().map(|x| x.show()).collect::<Vec<_>>()
        )),
        Rule::NumNotIn(set) if set.iter().any(|x| n.cmp(*x) == Some(Equal)) => {
            Some("is not allowed".into())
        }
        Rule::DefinedOnly => match (field.kind(), value.as_enum_number()) {
            (Kind::Enum(e), Some(number)) if e.get_value(number).is_none() => {
                Some(format!("{number} is not a value of {}", e.name()))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Checks gRPC requests against a [`Validator`] before the service sees
/// them; a request with violations gets INVALID_ARGUMENT naming them. Only
/// unary calls to methods whose input has rules are buffered and decoded;
/// everything else passes untouched.
#[derive(Clone)]
pub struct ValidateLayer {
    validator: Validator,
    /// `/package.Service/Method` → how its requests are checked.
    inputs: Arc<HashMap<String, Plan>>,
    max_bytes: usize,
}

/// How one method's requests are checked.
#[derive(Clone)]
enum Plan {
    /// Only top-level `REQUIRED` fields: (number, name, is a message or
    /// list), checked on the wire without decoding.
    Presence(Arc<[(u32, String, bool)]>),
    /// Anything else: decoded and walked.
    Full(MessageDescriptor),
}

impl ValidateLayer {
    /// A layer for every method in `pool` whose input has rules.
    pub fn new(pool: &DescriptorPool, validator: Validator, max_bytes: usize) -> ValidateLayer {
        let mut inputs = HashMap::new();
        for service in pool.services() {
            for method in service.methods() {
                if !method.is_client_streaming() && validator.applies_to(&method.input()) {
                    let plan = match validator.presence_only(&method.input()) {
                        Some(fields) => Plan::Presence(fields.into()),
                        None => Plan::Full(method.input()),
                    };
                    inputs.insert(format!("/{}/{}", service.full_name(), method.name()), plan);
                }
            }
        }
        ValidateLayer {
            validator,
            inputs: Arc::new(inputs),
            max_bytes,
        }
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Validate<S> {
        Validate {
            inner,
            layer: self.clone(),
        }
    }
}

/// A gRPC service whose requests are validated first.
#[derive(Clone)]
pub struct Validate<S> {
    inner: S,
    layer: ValidateLayer,
}

impl<S> Service<Request<Body>> for Validate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(plan) = self.layer.inputs.get(req.uri().path()).cloned() else {
            return Box::pin(self.inner.call(req));
        };
        // The service that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // Only the first message is needed: read that far, and pass the
            // rest of the stream (its end, trailers) through untouched, so a
            // unary call does not wait here for the end of the stream.
            let (bytes, body) = match first_frame(body, layer.max_bytes).await {
                Ok(read) => read,
                Err(error) => return Ok(status(error)),
            };
            // What does not decode is left to the service to report, as it would.
            if let Some(message) = first_message(&bytes) {
                let verdict = match plan {
                    Plan::Presence(required) => wire_fields(&message).map(|(sent, set)| {
                        let missing = required.iter().filter(|(number, _, is_message)| {
                            !if *is_message {
                                sent.contains(number)
                            } else {
                                set.contains(number)
                            }
                        });
                        report(
                            missing
                                .map(|(_, name, _)| (name.clone(), "is required".to_owned()))
                                .collect(),
                        )
                    }),
                    Plan::Full(input) => DynamicMessage::decode(input, message)
                        .ok()
                        .map(|decoded| layer.validator.check(&decoded)),
                };
                if let Some(Err(error)) = verdict {
                    return Ok(status(error));
                }
            }
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// Reads a gRPC request body until its first message is complete (or the
/// body ends); returns the bytes read and a body that replays them and then
/// goes on with the rest.
async fn first_frame(mut body: Body, max_bytes: usize) -> Result<(Bytes, Body), Error> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    let mut pending = None;
    let mut ended = false;
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > max_bytes {
                return Err(Error::new(
                    Code::ResourceExhausted,
                    "MESSAGE_TOO_LARGE",
                    format!("a {len}-byte message is over the {max_bytes}-byte limit"),
                ));
            }
            if buf.len() >= 5 + len {
                break;
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buf.extend_from_slice(&data),
                Err(other) => {
                    pending = Some(other);
                    break;
                }
            },
            Some(Err(e)) => {
                return Err(Error::new(Code::Cancelled, "REQUEST_BROKEN", e.to_string()));
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let head = buf.freeze();
    if ended {
        return Ok((head.clone(), Body::from(head)));
    }
    let first = futures_util::stream::iter(
        std::iter::once(http_body::Frame::data(head.clone()))
            .chain(pending)
            .map(Ok::<_, axum::Error>),
    );
    let rest = http_body_util::BodyStream::new(body);
    let replay = Body::new(http_body_util::StreamBody::new(
        futures_util::StreamExt::chain(first, rest),
    ));
    Ok((head, replay))
}

/// The first length-prefixed, uncompressed message of a gRPC body.
fn first_message(body: &Bytes) -> Option<Bytes> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let mut b = body.clone();
    b.advance(5);
    (b.len() >= len).then(|| b.split_to(len))
}

/// A trailers-only gRPC response carrying `error`.
fn status(error: Error) -> Response<Body> {
    tonic::Status::from(error)
        .into_http::<Body>()
        .into_response()
}
