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

use bytes::Bytes;
use http::{Request, Response};
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use tower::{BoxError, Layer, Service};
use trellis_core::{Code, Error, future::EitherFuture};

use crate::{
    annotations::{Num, Rule, field_rules},
    framing::FrameDecoder,
};

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
        let mut checks = HashMap::new();
        for message in pool.all_messages() {
            let mut list = Vec::new();
            for field in message.fields() {
                let rules = field_rules(&field).map_err(|message| RuleError {
                    field: field.full_name().to_owned(),
                    message,
                })?;
                if !rules.is_empty() {
                    list.push(Check {
                        field,
                        required: rules.required,
                        rules: rules.rules,
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
    pub(crate) fn presence_only(
        &self,
        message: &MessageDescriptor,
    ) -> Option<Vec<(u32, String, bool)>> {
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
fn wire_fields(mut b: &[u8]) -> Option<(FieldSet, FieldSet)> {
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
    let (mut sent, mut set) = (FieldSet::default(), FieldSet::default());
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
        sent.insert(number);
        if nonzero {
            set.insert(number);
        }
    }
    Some((sent, set))
}

/// Field numbers seen on the wire: a bit each below 64 (no allocation for
/// the messages of nearly every API), a list for the rest.
#[derive(Default)]
struct FieldSet {
    low: u64,
    high: Vec<u32>,
}

impl FieldSet {
    fn insert(&mut self, number: u32) {
        match 1u64.checked_shl(number) {
            Some(bit) if number < 64 => self.low |= bit,
            _ => self.high.push(number),
        }
    }

    fn contains(&self, number: &u32) -> bool {
        match 1u64.checked_shl(*number) {
            Some(bit) if *number < 64 => self.low & bit != 0,
            _ => self.high.contains(number),
        }
    }
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
        Rule::NumConst(c) if n.compare(*c) != Some(Equal) => Some(format!("must be {}", c.show())),
        Rule::Lt(b) if n.compare(*b) != Some(Less) => {
            Some(format!("must be less than {}", b.show()))
        }
        Rule::Lte(b) if !matches!(n.compare(*b), Some(Less | Equal)) => {
            Some(format!("must be at most {}", b.show()))
        }
        Rule::Gt(b) if n.compare(*b) != Some(Greater) => {
            Some(format!("must be greater than {}", b.show()))
        }
        Rule::Gte(b) if !matches!(n.compare(*b), Some(Greater | Equal)) => {
            Some(format!("must be at least {}", b.show()))
        }
        Rule::NumIn(set) if !set.iter().any(|x| n.compare(*x) == Some(Equal)) => Some(format!(
            "must be one of {:?}",
            set.iter().map(|x| x.show()).collect::<Vec<_>>()
        )),
        Rule::NumNotIn(set) if set.iter().any(|x| n.compare(*x) == Some(Equal)) => {
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

impl<S, B, RB> Service<Request<B>> for Validate<S>
where
    S: Service<Request<Replay<B>>, Response = Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = EitherFuture<
        S::Future,
        Pin<Box<dyn Future<Output = Result<Response<RB>, Infallible>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(plan) = self.layer.inputs.get(req.uri().path()).cloned() else {
            return EitherFuture::left(self.inner.call(req.map(Replay::passing)));
        };
        // The service that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let validator = self.layer.validator.clone();
        let max_bytes = self.layer.max_bytes;
        EitherFuture::right(Box::pin(async move {
            let (parts, body) = req.into_parts();
            // Only the first message is needed: read that far, and pass the
            // rest of the stream (its end, trailers) through untouched, so a
            // unary call does not wait here for the end of the stream.
            let (message, body) = match first_message(body, max_bytes).await {
                Ok(read) => read,
                Err(error) => return Ok(status(error)),
            };
            // What does not decode is left to the service to report, as it would.
            if let Some(message) = message {
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
                        .map(|decoded| validator.check(&decoded)),
                };
                if let Some(Err(error)) = verdict {
                    return Ok(status(error));
                }
            }
            inner.call(Request::from_parts(parts, body)).await
        }))
    }
}

/// Reads a gRPC request body until its first message is complete (or the
/// body ends); returns that message (`None` when the body holds none, or a
/// compressed one, left for the service to handle) and a body that replays
/// what was read and then goes on with the rest. A message over
/// `max_bytes` is refused from its header.
async fn first_message<B>(
    mut body: B,
    max_bytes: usize,
) -> Result<(Option<Bytes>, Replay<B>), Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let mut frames = FrameDecoder::new(max_bytes);
    // What was read, replayed as it came: no copy.
    let mut read = Replay::passing(None);
    let mut ended = false;
    let message = loop {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    // The usual case: the first data frame holds the whole
                    // message; it is sliced out, not copied.
                    if read.first.is_none()
                        && let Some(head) = crate::framing::header(&data)
                        && !head.compressed
                        && head.len <= max_bytes
                        && data.len() >= crate::framing::HEADER_LEN + head.len
                    {
                        let start = crate::framing::HEADER_LEN;
                        let message = data.slice(start..start + head.len);
                        read.first = Some(data);
                        break Some(message);
                    }
                    frames.push(&data);
                    read.push(data);
                    match frames.next_message() {
                        Ok(Some(message)) => break Some(message),
                        Ok(None) => {}
                        Err(e) if e.code() == Code::ResourceExhausted => return Err(e),
                        // Compressed: not ours to read.
                        Err(_) => break None,
                    }
                }
                Err(other) => {
                    read.pending = Some(other);
                    break None;
                }
            },
            Some(Err(e)) => {
                let e: BoxError = e.into();
                return Err(Error::new(Code::Cancelled, "REQUEST_BROKEN", e.to_string()));
            }
            None => {
                ended = true;
                break None;
            }
        }
    };
    read.rest = (!ended).then_some(body);
    Ok((message, read))
}

/// The request body a [`Validate`] layer passes on: what it read of the
/// original, given back as it came, then the rest of the original.
pub struct Replay<B> {
    first: Option<Bytes>,
    more: std::collections::VecDeque<Bytes>,
    pending: Option<http_body::Frame<Bytes>>,
    rest: Option<B>,
}

impl<B> Replay<B> {
    /// `body` as it is (nothing read from it); `None` for an ended one.
    pub fn passing(body: impl Into<Option<B>>) -> Replay<B> {
        Replay {
            first: None,
            more: std::collections::VecDeque::new(),
            pending: None,
            rest: body.into(),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() {
            self.first = Some(chunk);
        } else {
            self.more.push_back(chunk);
        }
    }
}

impl<B> http_body::Body for Replay<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.first.take().or_else(|| this.more.pop_front()) {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        if let Some(frame) = this.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.more.is_empty()
            && self.pending.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let read: usize = self.first.iter().chain(&self.more).map(Bytes::len).sum();
        match (&self.rest, &self.pending) {
            (Some(rest), None) => {
                let mut hint = rest.size_hint();
                hint.set_lower(hint.lower() + read as u64);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + read as u64);
                }
                hint
            }
            (None, None) => http_body::SizeHint::with_exact(read as u64),
            _ => http_body::SizeHint::default(),
        }
    }
}

/// A trailers-only gRPC response carrying `error`.
fn status<RB: Default>(error: Error) -> Response<RB> {
    tonic::Status::from(error).into_http()
}
