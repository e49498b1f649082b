//! The envelope: a CloudEvents 1.0 event, in structured JSON mode
//! (`application/cloudevents+json`) and in binary mode (`ce-*` headers,
//! the data as the body), each read back with every attribute bounded.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// The most bytes of data one event carries (NATS' default payload limit).
pub const MAX_DATA_BYTES: usize = 1024 * 1024;
/// The most characters of one attribute or extension value.
pub const MAX_ATTRIBUTE_CHARS: usize = 1024;
/// The most extension attributes on one event.
pub const MAX_EXTENSIONS: usize = 16;
/// The content type of protobuf data ([`Event::proto`]).
pub const PROTOBUF_CONTENT_TYPE: &str = "application/protobuf";
/// The content type of structured mode.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// A CloudEvents 1.0 event.
///
/// `subject` is CloudEvents' own: what the event is about within its
/// source — in Trellis the aggregate (`order/42`), and so the key that
/// orders the outbox per aggregate. The bus subject it travels on
/// (`shop.order.created`) is given to [`Bus::publish`](crate::Bus::publish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `id`: unique per `source`; the message id the bus deduplicates by.
    pub id: String,
    /// `source`: who emitted it, a URI reference (`/shop/order`).
    pub source: String,
    /// `type`: what happened (`shop.order.created.v1`).
    pub ty: String,
    /// `subject`: what it is about within the source (`order/42`).
    pub subject: Option<String>,
    /// `time`: when it happened, RFC 3339.
    pub time: Option<String>,
    /// `datacontenttype`.
    pub content_type: Option<String>,
    /// `dataschema`: the schema id of the data (a proto message's full
    /// name as `proto:shop.order.v1.OrderCreated`, or a URI).
    pub data_schema: Option<String>,
    /// The data.
    pub data: Bytes,
    /// Extension attributes (lowercase letters and digits, at most 20).
    pub extensions: BTreeMap<String, String>,
}

/// An event that cannot be read or sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CloudEvent: {0}")]
pub struct EventError(pub String);

fn invalid(message: impl Into<String>) -> EventError {
    EventError(message.into())
}

impl Event {
    /// An event with a new time-ordered id (UUIDv7) and the current time.
    pub fn new(source: impl Into<String>, ty: impl Into<String>, data: impl Into<Bytes>) -> Event {
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: Some(rfc3339_micros(now_micros())),
            content_type: None,
            data_schema: None,
            data: data.into(),
            extensions: BTreeMap::new(),
        }
    }

    /// An event whose data is `value` as JSON (`application/json`).
    pub fn json(
        source: impl Into<String>,
        ty: impl Into<String>,
        value: &impl Serialize,
    ) -> Result<Event, EventError> {
        let data = serde_json::to_vec(value).map_err(|e| invalid(format!("data: {e}")))?;
        Ok(Event::new(source, ty, data).with_content_type("application/json"))
    }

    /// An event whose data is an encoded protobuf message
    /// (`application/protobuf`), its schema `proto:{message}` (the
    /// message's full name, e.g. `shop.order.v1.OrderPlaced`).
    pub fn proto(
        source: impl Into<String>,
        ty: impl Into<String>,
        message: &str,
        data: impl Into<Bytes>,
    ) -> Event {
        Event::new(source, ty, data)
            .with_content_type(PROTOBUF_CONTENT_TYPE)
            .with_schema(format!("proto:{message}"))
    }

    /// The protobuf message's full name when the data is one
    /// ([`Event::proto`]).
    pub fn proto_message(&self) -> Option<&str> {
        self.data_schema.as_deref()?.strip_prefix("proto:")
    }

    /// Sets `subject` (the aggregate this event is about).
    pub fn with_subject(mut self, subject: impl Into<String>) -> Event {
        self.subject = Some(subject.into());
        self
    }

    /// Sets `datacontenttype`.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Event {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets `dataschema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Event {
        self.data_schema = Some(schema.into());
        self
    }

    /// Sets an extension attribute.
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Event {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// `time` as microseconds since the Unix epoch, when set and valid.
    pub fn time_micros(&self) -> Option<i64> {
        parse_rfc3339(self.time.as_deref()?)
    }

    /// The data read as JSON.
    pub fn json_data<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        serde_json::from_slice(&self.data).map_err(|e| invalid(format!("data: {e}")))
    }

    /// Checks the required attributes, names and sizes.
    pub fn validate(&self) -> Result<(), EventError> {
        for (name, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.ty),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("`{name}` is required")));
            }
            check_value(name, value)?;
        }
        for (name, value) in self.optional() {
            if let Some(value) = value {
                check_value(name, value)?;
            }
        }
        if self.data.len() > MAX_DATA_BYTES {
            return Err(invalid(format!(
                "data is {} bytes, more than {MAX_DATA_BYTES}",
                self.data.len()
            )));
        }
        if self.extensions.len() > MAX_EXTENSIONS {
            return Err(invalid(format!(
                "{} extensions, more than {MAX_EXTENSIONS}",
                self.extensions.len()
            )));
        }
        for (name, value) in &self.extensions {
            check_extension_name(name)?;
            check_value(name, value)?;
        }
        Ok(())
    }

    /// The optional attributes with their names.
    fn optional(&self) -> [(&'static str, &Option<String>); 4] {
        [
            ("subject", &self.subject),
            ("time", &self.time),
            ("datacontenttype", &self.content_type),
            ("dataschema", &self.data_schema),
        ]
    }

    fn is_json(&self) -> bool {
        is_json_type(self.content_type.as_deref())
    }

    /// The attributes as one JSON object of binary-mode headers, for
    /// stores that keep the data beside them (byte for byte).
    pub fn attributes_json(&self) -> String {
        let map: BTreeMap<String, String> = self.to_headers().into_iter().collect();
        serde_json::to_string(&map).unwrap_or_default()
    }

    /// Reads [`attributes_json`](Self::attributes_json) and the data back.
    pub fn from_attributes_json(attributes: &str, data: Bytes) -> Result<Event, EventError> {
        let map: BTreeMap<String, String> =
            serde_json::from_str(attributes).map_err(|e| invalid(format!("attributes: {e}")))?;
        Event::from_headers(map.iter().map(|(k, v)| (k.as_str(), v.as_str())), data)
    }

    /// Structured mode: the whole event as one JSON document.
    pub fn to_structured(&self) -> Vec<u8> {
        let mut doc = Map::new();
        doc.insert("specversion".into(), "1.0".into());
        doc.insert("id".into(), self.id.clone().into());
        doc.insert("source".into(), self.source.clone().into());
        doc.insert("type".into(), self.ty.clone().into());
        for (name, value) in self.optional() {
            if let Some(value) = value {
                doc.insert(name.into(), value.clone().into());
            }
        }
        for (name, value) in &self.extensions {
            doc.insert(name.clone(), value.clone().into());
        }
        if !self.data.is_empty() {
            match serde_json::from_slice::<Value>(&self.data) {
                Ok(value) if self.is_json() => {
                    doc.insert("data".into(), value);
                }
                _ => {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(&self.data);
                    doc.insert("data_base64".into(), encoded.into());
                }
            }
        }
        serde_json::to_vec(&Value::Object(doc)).unwrap_or_default()
    }

    /// Reads structured mode; at most `MAX_DATA_BYTES` of data and
    /// bounded attributes.
    pub fn from_structured(bytes: &[u8]) -> Result<Event, EventError> {
        if bytes.len() > MAX_DATA_BYTES * 2 {
            return Err(invalid(format!("{} bytes is too large", bytes.len())));
        }
        let Value::Object(mut doc) =
            serde_json::from_slice::<Value>(bytes).map_err(|e| invalid(format!("JSON: {e}")))?
        else {
            return Err(invalid("not a JSON object"));
        };
        let spec = take_string(&mut doc, "specversion")?;
        if spec.as_deref() != Some("1.0") {
            return Err(invalid(format!(
                "specversion {spec:?} is not supported (1.0 is)"
            )));
        }
        let required = |doc: &mut Map<String, Value>, name: &str| {
            take_string(doc, name)?.ok_or_else(|| invalid(format!("`{name}` is required")))
        };
        let id = required(&mut doc, "id")?;
        let source = required(&mut doc, "source")?;
        let ty = required(&mut doc, "type")?;
        let subject = take_string(&mut doc, "subject")?;
        let time = take_string(&mut doc, "time")?;
        let content_type = take_string(&mut doc, "datacontenttype")?;
        let data_schema = take_string(&mut doc, "dataschema")?;
        let data = match (doc.remove("data"), doc.remove("data_base64")) {
            (Some(_), Some(_)) => return Err(invalid("both `data` and `data_base64`")),
            (Some(Value::String(text)), None) if !is_json_type(content_type.as_deref()) => {
                Bytes::from(text)
            }
            (Some(value), None) => Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
            (None, Some(Value::String(encoded))) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| invalid(format!("data_base64: {e}")))?
                .into(),
            (None, Some(_)) => return Err(invalid("`data_base64` is not a string")),
            (None, None) => Bytes::new(),
        };
        let mut extensions = BTreeMap::new();
        for (name, value) in doc {
            let value = match value {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return Err(invalid(format!("extension `{name}` is not a scalar"))),
            };
            extensions.insert(name, value);
        }
        let event = Event {
            id,
            source,
            ty,
            subject,
            time,
            content_type,
            data_schema,
            data,
            extensions,
        };
        event.validate()?;
        Ok(event)
    }

    /// Binary mode: the attributes as `ce-*` headers (and `content-type`),
    /// the data as the body.
    pub fn to_headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![
            ("ce-specversion".to_owned(), "1.0".to_owned()),
            ("ce-id".to_owned(), self.id.clone()),
            ("ce-source".to_owned(), self.source.clone()),
            ("ce-type".to_owned(), self.ty.clone()),
        ];
        for (name, value) in [
            ("ce-subject", &self.subject),
            ("ce-time", &self.time),
            ("ce-dataschema", &self.data_schema),
            ("content-type", &self.content_type),
        ] {
            if let Some(value) = value {
                headers.push((name.to_owned(), value.clone()));
            }
        }
        for (name, value) in &self.extensions {
            headers.push((format!("ce-{name}"), value.clone()));
        }
        headers
    }

    /// Reads binary mode from headers (names case-insensitive) and the body.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        data: Bytes,
    ) -> Result<Event, EventError> {
        let mut event = Event {
            id: String::new(),
            source: String::new(),
            ty: String::new(),
            subject: None,
            time: None,
            content_type: None,
            data_schema: None,
            data,
            extensions: BTreeMap::new(),
        };
        let mut spec = None;
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            if name == "content-type" {
                event.content_type = Some(value.to_owned());
                continue;
            }
            let Some(attribute) = name.strip_prefix("ce-") else {
                continue;
            };
            let value = value.to_owned();
            match attribute {
                "specversion" => spec = Some(value),
                "id" => event.id = value,
                "source" => event.source = value,
                "type" => event.ty = value,
                "subject" => event.subject = Some(value),
                "time" => event.time = Some(value),
                "dataschema" => event.data_schema = Some(value),
                other => {
                    if event.extensions.len() >= MAX_EXTENSIONS {
                        return Err(invalid(format!("more than {MAX_EXTENSIONS} extensions")));
                    }
                    event.extensions.insert(other.to_owned(), value);
                }
            }
        }
        if spec.as_deref() != Some("1.0") {
            return Err(invalid(format!(
                "ce-specversion {spec:?} is not supported (1.0 is)"
            )));
        }
        event.validate()?;
        Ok(event)
    }
}

fn is_json_type(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        t == "application/json" || t.ends_with("+json") || t == "text/json"
    })
}

fn take_string(doc: &mut Map<String, Value>, name: &str) -> Result<Option<String>, EventError> {
    match doc.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("`{name}` is not a string"))),
    }
}

fn check_value(name: &str, value: &str) -> Result<(), EventError> {
    if value.chars().count() > MAX_ATTRIBUTE_CHARS {
        return Err(invalid(format!(
            "`{name}` is longer than {MAX_ATTRIBUTE_CHARS} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("`{name}` has control characters")));
    }
    Ok(())
}

fn check_extension_name(name: &str) -> Result<(), EventError> {
    let reserved = [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "data",
        "data_base64",
    ];
    if name.is_empty()
        || name.len() > 20
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        || reserved.contains(&name)
    {
        return Err(invalid(format!(
            "extension name {name:?} must be 1-20 lowercase letters or digits and not an attribute's"
        )));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `micros` since the Unix epoch as RFC 3339 in UTC.
pub(crate) fn rfc3339_micros(micros: i64) -> String {
    let fraction = u32::try_from(micros.rem_euclid(1_000_000)).unwrap_or(0);
    trellis_telemetry::rfc3339(micros.div_euclid(1_000_000), fraction)
}

/// Reads an RFC 3339 timestamp (`2026-11-30T23:40:01.120Z`, an offset
/// instead of `Z`, any number of fraction digits) as microseconds since
/// the Unix epoch.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        text.get(from..to)?.bytes().try_fold(0i64, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut micros = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, d) in fraction.bytes().take(digits).enumerate() {
            if i < 6 {
                micros += i64::from(d - b'0') * 10i64.pow(5 - i as u32);
            }
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let part = |from: usize| -> Option<i64> {
                let two = rest.get(from..from + 2)?;
                two.bytes()
                    .all(|d| d.is_ascii_digit())
                    .then(|| two.parse().ok())?
            };
            sign * (part(1)? * 3600 + part(4)? * 60)
        }
    };
    // Days since 1970-01-01 from the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(seconds * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn times() {
        let micros = 951_782_400_123_456;
        assert_eq!(rfc3339_micros(micros), "2000-02-29T00:00:00.123456Z");
        assert_eq!(parse_rfc3339(&rfc3339_micros(micros)), Some(micros));
        assert_eq!(
            parse_rfc3339("2000-02-29T01:30:00.123456+01:30"),
            Some(micros)
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.5Z"), Some(500_000));
        for bad in [
            "",
            "2000-13-01T00:00:00Z",
            "2000-01-01T00:00:00",
            "2000-01-01T00:00:00.Z",
            "x000-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        let now = now_micros();
        assert_eq!(parse_rfc3339(&rfc3339_micros(now)), Some(now));
    }

    #[test]
    fn json_data_is_embedded_and_binary_data_is_base64() {
        let event = Event::json(
            "/shop/order",
            "shop.order.created.v1",
            &serde_json::json!({"id": 7}),
        )
        .expect("json")
        .with_subject("order/7");
        let doc: Value = serde_json::from_slice(&event.to_structured()).expect("doc");
        assert_eq!(doc["data"]["id"], 7);
        assert_eq!(doc["subject"], "order/7");
        let binary = Event::new("/s", "t", vec![0u8, 159, 146, 150])
            .with_content_type("application/protobuf");
        let doc: Value = serde_json::from_slice(&binary.to_structured()).expect("doc");
        assert_eq!(doc["data_base64"], "AJ+Slg==");
        assert_eq!(Event::from_structured(&binary.to_structured()), Ok(binary));
    }

    #[test]
    fn bad_events_are_refused_with_the_reason() {
        let missing = br#"{"specversion":"1.0","id":"1","type":"t"}"#;
        assert!(
            Event::from_structured(missing)
                .unwrap_err()
                .0
                .contains("source")
        );
        let version = br#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#;
        assert!(
            Event::from_structured(version)
                .unwrap_err()
                .0
                .contains("specversion")
        );
        let nested = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":{}}"#;
        assert!(
            Event::from_structured(nested)
                .unwrap_err()
                .0
                .contains("scalar")
        );
        let upper = Event::new("s", "t", "").with_extension("Bad", "v");
        assert!(upper.validate().is_err());
        let long = Event::new("s", "t", "").with_subject("x".repeat(MAX_ATTRIBUTE_CHARS + 1));
        assert!(long.validate().is_err());
        let headers = [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")];
        assert!(Event::from_headers(headers, Bytes::new()).is_err());
    }

    fn attribute() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9/._:-]{1,40}"
    }

    proptest! {
        #[test]
        fn both_modes_round_trip(
            id in attribute(), source in attribute(), ty in attribute(),
            subject in proptest::option::of(attribute()),
            schema in proptest::option::of(attribute()),
            data in proptest::collection::vec(any::<u8>(), 0..64),
            json in any::<bool>(),
            extensions in proptest::collection::btree_map("[a-z][a-z0-9]{0,19}", attribute(), 0..4),
        ) {
            let extensions: BTreeMap<String, String> = extensions
                .into_iter()
                .filter(|(k, _)| check_extension_name(k).is_ok())
                .collect();
            let (data, content_type) = if json {
                (Bytes::from(serde_json::to_vec(&data).unwrap()), Some("application/json".to_owned()))
            } else {
                (Bytes::from(data), Some("application/octet-stream".to_owned()))
            };
            let event = Event {
                id, source, ty, subject, time: Some(rfc3339_micros(now_micros())), content_type,
                data_schema: schema, data, extensions,
            };
            prop_assert_eq!(Event::from_structured(&event.to_structured()), Ok(event.clone()));
            let headers = event.to_headers();
            let back = Event::from_headers(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                event.data.clone(),
            );
            prop_assert_eq!(back, Ok(event));
        }
    }
}
