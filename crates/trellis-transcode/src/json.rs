//! Protobuf wire bytes straight to proto3 JSON, without building a
//! `DynamicMessage` first.
//!
//! A response used to be decoded into a `DynamicMessage` (a map entry and
//! an allocation per field) and serialized through serde and
//! `core::fmt` (a timestamp alone went through a dozen `write!` calls):
//! about 36 000 instructions for a user record, a third of what the whole
//! gRPC call costs the server. Here each response type is compiled once
//! into a [`Plans`] entry — fields by number, their JSON keys already
//! quoted, their defaults already written — and the wire bytes are walked
//! once, writing JSON as they go.
//!
//! The output is exactly what `prost-reflect`'s serializer writes with the
//! transcoder's options (fields in number order, fields without presence
//! written with their defaults, 64-bit integers as strings, enums by name).
//! The walk takes the encoding every protobuf library writes — fields in
//! ascending number order, each repeated field in one run, no field twice
//! — and gives up on anything else ([`Fallback`]): out-of-order fields,
//! groups, malformed bytes, invalid UTF-8, rare well-known types' edge
//! cases. The caller then takes the `DynamicMessage` path, which gives the
//! same answer or the same error, so the walk never changes an outcome,
//! only its cost. Well-known types other than `Timestamp` and `Empty`
//! (`Any`, `Struct`, `Duration`, the wrappers, …) are written by
//! `prost-reflect` from a message decoded for just that field.

use std::collections::HashMap;

use base64::{Engine as _, prelude::BASE64_STANDARD};
use prost_reflect::{
    DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions,
};

/// The walk met something it does not write itself; decode and serialize
/// the whole message the general way instead.
#[derive(Debug)]
pub(crate) struct Fallback;

type Walk<T = ()> = Result<T, Fallback>;

/// Every response message type, compiled for the walk. Built once with the
/// routes; read-only afterwards.
#[derive(Debug, Default)]
pub(crate) struct Plans {
    plans: Vec<MessagePlan>,
    by_name: HashMap<String, usize>,
}

#[derive(Debug)]
struct MessagePlan {
    descriptor: MessageDescriptor,
    special: Special,
    /// The fields, ascending by number.
    fields: Vec<FieldPlan>,
    /// `number → index + 1` for numbers below [`DIRECT`]; 0 = unknown.
    direct: Vec<u16>,
    /// The message has extension ranges: a field the plan does not know
    /// may be an extension, which `prost-reflect` writes.
    extensible: bool,
    /// The JSON of this message with every field at its default: what
    /// the output is at least, so the buffer is sized once.
    least: usize,
}

/// Field numbers below this are found by indexing, above by binary search.
const DIRECT: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    /// An ordinary message: `{ fields }`.
    None,
    /// `google.protobuf.Timestamp`: an RFC 3339 string.
    Timestamp,
    /// `google.protobuf.Empty`: `{}`.
    Empty,
    /// Another well-known type: `prost-reflect` writes it.
    Delegate,
}

#[derive(Debug)]
struct FieldPlan {
    number: u32,
    /// `"jsonName":`
    key: Box<[u8]>,
    kind: Scalar,
    shape: Shape,
    /// What an absent field without presence is written as; `None` for
    /// fields with presence (messages, oneof members, `optional`), which
    /// are left out when absent.
    default: Option<Box<[u8]>>,
}

#[derive(Debug)]
enum Shape {
    Single,
    List,
    /// A map: the entry's key and value kinds.
    Map(Scalar, Scalar),
}

#[derive(Debug, Clone)]
enum Scalar {
    Double,
    Float,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Sint32,
    Sint64,
    Fixed32,
    Fixed64,
    Sfixed32,
    Sfixed64,
    Bool,
    String,
    Bytes,
    Enum(EnumPlan),
    Message(usize),
}

#[derive(Debug, Clone)]
struct EnumPlan {
    /// `google.protobuf.NullValue` is written as `null`.
    null: bool,
    /// (number, name), ascending by number.
    values: std::sync::Arc<[(i32, Box<str>)]>,
}

impl Plans {
    /// The plan of `message` (and of every message it holds), compiling it
    /// on first sight; returns its index.
    pub(crate) fn add(&mut self, message: &MessageDescriptor) -> usize {
        if let Some(&index) = self.by_name.get(message.full_name()) {
            return index;
        }
        let index = self.plans.len();
        self.by_name.insert(message.full_name().to_owned(), index);
        let special = match message.full_name() {
            "google.protobuf.Timestamp" => Special::Timestamp,
            "google.protobuf.Empty" => Special::Empty,
            name if name.starts_with("google.protobuf.") && is_delegated(name) => Special::Delegate,
            _ => Special::None,
        };
        self.plans.push(MessagePlan {
            descriptor: message.clone(),
            special,
            fields: Vec::new(),
            direct: Vec::new(),
            extensible: message.extension_ranges().len() > 0,
            least: 2,
        });
        if special != Special::None {
            return index;
        }
        let mut fields = Vec::new();
        // `fields()` is in number order.
        for field in message.fields() {
            let plan = self.field(&field);
            fields.push(plan);
        }
        let mut direct = vec![0u16; DIRECT as usize];
        for (i, f) in fields.iter().enumerate() {
            if f.number < DIRECT {
                direct[f.number as usize] = u16::try_from(i + 1).unwrap_or(0);
            }
        }
        let least = 2 + fields
            .iter()
            .map(|f| f.key.len() + 1 + f.default.as_ref().map_or(0, |d| d.len()))
            .sum::<usize>();
        let plan = &mut self.plans[index];
        plan.fields = fields;
        plan.direct = direct;
        plan.least = least;
        index
    }

    /// A buffer size for the JSON of `wire`, a message of type `plan`:
    /// its defaults, plus twice the wire bytes (quotes, escapes, keys of
    /// nested messages).
    pub(crate) fn capacity(&self, plan: usize, wire: &[u8]) -> usize {
        self.plans.get(plan).map_or(64, |p| p.least) + 2 * wire.len()
    }

    fn field(&mut self, field: &FieldDescriptor) -> FieldPlan {
        let mut key = Vec::with_capacity(field.json_name().len() + 3);
        write_str(&mut key, field.json_name());
        key.push(b':');
        let (kind, shape) = if let (true, Kind::Message(entry)) = (field.is_map(), field.kind()) {
            let key_kind = self.scalar(&entry.map_entry_key_field().kind());
            let value_kind = self.scalar(&entry.map_entry_value_field().kind());
            (value_kind.clone(), Shape::Map(key_kind, value_kind))
        } else if field.is_list() {
            (self.scalar(&field.kind()), Shape::List)
        } else {
            (self.scalar(&field.kind()), Shape::Single)
        };
        let default = (!field.supports_presence()).then(|| {
            let mut out = Vec::new();
            match shape {
                Shape::List => out.extend_from_slice(b"[]"),
                Shape::Map(..) => out.extend_from_slice(b"{}"),
                Shape::Single => write_default(&mut out, &kind),
            }
            out.into_boxed_slice()
        });
        FieldPlan {
            number: field.number(),
            key: key.into_boxed_slice(),
            kind,
            shape,
            default,
        }
    }

    fn scalar(&mut self, kind: &Kind) -> Scalar {
        match kind {
            Kind::Double => Scalar::Double,
            Kind::Float => Scalar::Float,
            Kind::Int32 => Scalar::Int32,
            Kind::Int64 => Scalar::Int64,
            Kind::Uint32 => Scalar::Uint32,
            Kind::Uint64 => Scalar::Uint64,
            Kind::Sint32 => Scalar::Sint32,
            Kind::Sint64 => Scalar::Sint64,
            Kind::Fixed32 => Scalar::Fixed32,
            Kind::Fixed64 => Scalar::Fixed64,
            Kind::Sfixed32 => Scalar::Sfixed32,
            Kind::Sfixed64 => Scalar::Sfixed64,
            Kind::Bool => Scalar::Bool,
            Kind::String => Scalar::String,
            Kind::Bytes => Scalar::Bytes,
            Kind::Enum(e) => Scalar::Enum(enum_plan(e)),
            Kind::Message(m) => Scalar::Message(self.add(m)),
        }
    }

    /// `wire`, a message of the type [`add`](Self::add) returned `plan`
    /// for, as JSON appended to `out`.
    pub(crate) fn write(&self, plan: usize, wire: &[u8], out: &mut Vec<u8>) -> Walk {
        self.message(plan, wire, out, 0)
    }

    fn message(&self, plan: usize, wire: &[u8], out: &mut Vec<u8>, depth: u32) -> Walk {
        // prost decodes at most 100 levels; deeper is the general path's
        // error to give.
        if depth > 100 {
            return Err(Fallback);
        }
        let plan = self.plans.get(plan).ok_or(Fallback)?;
        match plan.special {
            Special::None => {}
            Special::Timestamp => return timestamp(wire, out),
            Special::Empty => {
                return if wire.is_empty() {
                    out.extend_from_slice(b"{}");
                    Ok(())
                } else {
                    Err(Fallback)
                };
            }
            Special::Delegate => return delegate(&plan.descriptor, wire, out),
        }
        out.push(b'{');
        let mut comma = false;
        // Fields before this index have been written (or had no default).
        let mut next = 0usize;
        // The repeated field whose run is open: (index, closing byte).
        let mut open: Option<(usize, u8)> = None;
        // Keys seen in the open map, to refuse duplicates.
        let mut keys: Vec<MapKey<'_>> = Vec::new();
        let mut r = Reader(wire);
        while !r.is_empty() {
            let (number, wire_type) = r.tag()?;
            let Some(index) = plan.find(number) else {
                if plan.extensible {
                    return Err(Fallback);
                }
                r.skip(wire_type)?;
                continue;
            };
            let field = &plan.fields[index];
            let continues = matches!(open, Some((i, _)) if i == index);
            if !continues {
                if let Some((_, close)) = open.take() {
                    out.push(close);
                }
                if index < next {
                    // Out of order, or a singular field twice.
                    return Err(Fallback);
                }
                for skipped in &plan.fields[next..index] {
                    if let Some(default) = &skipped.default {
                        separate(out, &mut comma);
                        out.extend_from_slice(&skipped.key);
                        out.extend_from_slice(default);
                    }
                }
                next = index + 1;
                separate(out, &mut comma);
                out.extend_from_slice(&field.key);
                match field.shape {
                    Shape::Single => {
                        self.value(&field.kind, wire_type, &mut r, out, depth)?;
                        continue;
                    }
                    Shape::List => {
                        out.push(b'[');
                        open = Some((index, b']'));
                    }
                    Shape::Map(..) => {
                        out.push(b'{');
                        open = Some((index, b'}'));
                        keys.clear();
                    }
                }
            } else {
                out.push(b',');
            }
            match &field.shape {
                Shape::Single => return Err(Fallback),
                Shape::List => {
                    if wire_type == LEN && field.kind.packable() {
                        let mut packed = Reader(r.bytes()?);
                        let mut first = true;
                        while !packed.is_empty() {
                            if !first {
                                out.push(b',');
                            }
                            first = false;
                            self.value(
                                &field.kind,
                                field.kind.wire_type(),
                                &mut packed,
                                out,
                                depth,
                            )?;
                        }
                        if first {
                            // An empty packed run: no element was written
                            // after the separator just pushed.
                            if out.last() == Some(&b',') {
                                out.pop();
                            }
                        }
                    } else {
                        self.value(&field.kind, wire_type, &mut r, out, depth)?;
                    }
                }
                Shape::Map(key_kind, value_kind) => {
                    if wire_type != LEN {
                        return Err(Fallback);
                    }
                    let entry = r.bytes()?;
                    self.map_entry(key_kind, value_kind, entry, &mut keys, out, depth)?;
                }
            }
        }
        if let Some((_, close)) = open.take() {
            out.push(close);
        }
        for skipped in &plan.fields[next..] {
            if let Some(default) = &skipped.default {
                separate(out, &mut comma);
                out.extend_from_slice(&skipped.key);
                out.extend_from_slice(default);
            }
        }
        out.push(b'}');
        Ok(())
    }

    fn map_entry<'a>(
        &self,
        key_kind: &Scalar,
        value_kind: &Scalar,
        entry: &'a [u8],
        keys: &mut Vec<MapKey<'a>>,
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Walk {
        let mut r = Reader(entry);
        let mut key: Option<(u32, Reader<'a>)> = None;
        let mut value: Option<(u32, Reader<'a>)> = None;
        while !r.is_empty() {
            let (number, wire_type) = r.tag()?;
            let start = r;
            r.skip(wire_type)?;
            let taken = &start.0[..start.0.len() - r.0.len()];
            let slot = match number {
                1 => &mut key,
                2 => &mut value,
                _ => continue,
            };
            if slot.is_some() {
                return Err(Fallback);
            }
            *slot = Some((wire_type, Reader(taken)));
        }
        // The key, as a JSON string, remembered to refuse duplicates.
        let map_key = match (key_kind, key) {
            (Scalar::String, Some((LEN, mut k))) => {
                let s = std::str::from_utf8(k.bytes()?).map_err(|_| Fallback)?;
                write_str(out, s);
                MapKey::Str(s)
            }
            (Scalar::String, None) => {
                out.extend_from_slice(b"\"\"");
                MapKey::Str("")
            }
            (Scalar::String, Some(_)) => return Err(Fallback),
            (kind, key) => {
                let mut text = Vec::with_capacity(24);
                match key {
                    Some((wire_type, mut k)) => {
                        self.value(kind, wire_type, &mut k, &mut text, depth)?
                    }
                    None => write_default(&mut text, kind),
                }
                // 64-bit keys come out quoted already; the rest are quoted here.
                let quoted = text.first() == Some(&b'"');
                if !quoted {
                    out.push(b'"');
                }
                out.extend_from_slice(&text);
                if !quoted {
                    out.push(b'"');
                }
                MapKey::Number(text)
            }
        };
        if keys.contains(&map_key) {
            return Err(Fallback);
        }
        keys.push(map_key);
        out.push(b':');
        match value {
            Some((wire_type, mut v)) => self.value(value_kind, wire_type, &mut v, out, depth),
            None => match value_kind {
                Scalar::Message(plan) => self.message(*plan, &[], out, depth + 1),
                kind => {
                    write_default(out, kind);
                    Ok(())
                }
            },
        }
    }

    /// One value of `kind`, read from `r` (wire type `wire_type`).
    fn value(
        &self,
        kind: &Scalar,
        wire_type: u32,
        r: &mut Reader<'_>,
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Walk {
        if wire_type != kind.wire_type() {
            return Err(Fallback);
        }
        match kind {
            Scalar::Double => float(out, f64::from_bits(r.fixed64()?)),
            Scalar::Float => float32(out, f32::from_bits(r.fixed32()?)),
            Scalar::Int32 => integer(out, r.varint()? as i32),
            Scalar::Int64 => quoted(out, r.varint()? as i64),
            Scalar::Uint32 => integer(out, r.varint()? as u32),
            Scalar::Uint64 => quoted(out, r.varint()?),
            Scalar::Sint32 => integer(out, zigzag(r.varint()?) as i32),
            Scalar::Sint64 => quoted(out, zigzag(r.varint()?)),
            Scalar::Fixed32 => integer(out, r.fixed32()?),
            Scalar::Fixed64 => quoted(out, r.fixed64()?),
            Scalar::Sfixed32 => integer(out, r.fixed32()? as i32),
            Scalar::Sfixed64 => quoted(out, r.fixed64()? as i64),
            Scalar::Bool => {
                out.extend_from_slice(if r.varint()? != 0 { b"true" } else { b"false" })
            }
            Scalar::String => {
                let s = std::str::from_utf8(r.bytes()?).map_err(|_| Fallback)?;
                write_str(out, s);
            }
            Scalar::Bytes => {
                let bytes = r.bytes()?;
                out.push(b'"');
                let start = out.len();
                out.resize(start + bytes.len().div_ceil(3) * 4, 0);
                let written = BASE64_STANDARD
                    .encode_slice(bytes, &mut out[start..])
                    .map_err(|_| Fallback)?;
                out.truncate(start + written);
                out.push(b'"');
            }
            Scalar::Enum(e) => write_enum(out, e, r.varint()? as i32),
            Scalar::Message(plan) => {
                let bytes = r.bytes()?;
                self.message(*plan, bytes, out, depth + 1)?;
            }
        }
        Ok(())
    }
}

impl MessagePlan {
    fn find(&self, number: u32) -> Option<usize> {
        if number < DIRECT {
            let i = *self.direct.get(number as usize)?;
            return (i != 0).then(|| usize::from(i) - 1);
        }
        self.fields.binary_search_by_key(&number, |f| f.number).ok()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum MapKey<'a> {
    Str(&'a str),
    Number(Vec<u8>),
}

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

impl Scalar {
    fn wire_type(&self) -> u32 {
        match self {
            Scalar::Double | Scalar::Fixed64 | Scalar::Sfixed64 => I64,
            Scalar::Float | Scalar::Fixed32 | Scalar::Sfixed32 => I32,
            Scalar::String | Scalar::Bytes | Scalar::Message(_) => LEN,
            _ => VARINT,
        }
    }

    fn packable(&self) -> bool {
        self.wire_type() != LEN
    }
}

fn is_delegated(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Any"
            | "google.protobuf.Duration"
            | "google.protobuf.Struct"
            | "google.protobuf.Value"
            | "google.protobuf.ListValue"
            | "google.protobuf.FieldMask"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

fn enum_plan(e: &EnumDescriptor) -> EnumPlan {
    let mut values: Vec<(i32, Box<str>)> =
        e.values().map(|v| (v.number(), v.name().into())).collect();
    values.sort_by_key(|(n, _)| *n);
    // An alias keeps the first name, as `get_value` does.
    values.dedup_by_key(|(n, _)| *n);
    EnumPlan {
        null: e.full_name() == "google.protobuf.NullValue",
        values: values.into(),
    }
}

fn write_enum(out: &mut Vec<u8>, e: &EnumPlan, number: i32) {
    if e.null {
        out.extend_from_slice(b"null");
        return;
    }
    match e.values.binary_search_by_key(&number, |(n, _)| *n) {
        Ok(i) => {
            out.push(b'"');
            out.extend_from_slice(e.values[i].1.as_bytes());
            out.push(b'"');
        }
        Err(_) => integer(out, number),
    }
}

fn write_default(out: &mut Vec<u8>, kind: &Scalar) {
    match kind {
        Scalar::Double => float(out, 0.0),
        Scalar::Float => float32(out, 0.0),
        Scalar::Int64 | Scalar::Uint64 | Scalar::Sint64 | Scalar::Fixed64 | Scalar::Sfixed64 => {
            out.extend_from_slice(b"\"0\"")
        }
        Scalar::Bool => out.extend_from_slice(b"false"),
        Scalar::String | Scalar::Bytes => out.extend_from_slice(b"\"\""),
        Scalar::Enum(e) => write_enum(out, e, 0),
        Scalar::Message(_) => out.extend_from_slice(b"null"),
        _ => out.push(b'0'),
    }
}

fn separate(out: &mut Vec<u8>, comma: &mut bool) {
    if *comma {
        out.push(b',');
    }
    *comma = true;
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping, so the output matches prost-reflect's.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn integer<I: itoa::Integer>(out: &mut Vec<u8>, v: I) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn quoted<I: itoa::Integer>(out: &mut Vec<u8>, v: I) {
    out.push(b'"');
    integer(out, v);
    out.push(b'"');
}

fn float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &v);
    } else {
        non_finite(out, v.is_nan(), v > 0.0);
    }
}

fn float32(out: &mut Vec<u8>, v: f32) {
    if v.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &v);
    } else {
        non_finite(out, v.is_nan(), v > 0.0);
    }
}

fn non_finite(out: &mut Vec<u8>, nan: bool, positive: bool) {
    out.extend_from_slice(match (nan, positive) {
        (true, _) => b"\"NaN\"",
        (false, true) => b"\"Infinity\"",
        (false, false) => b"\"-Infinity\"",
    });
}

fn zigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// `google.protobuf.Timestamp` as RFC 3339 (`2026-11-30T08:48:45.123Z`),
/// with 0, 3, 6 or 9 fraction digits as prost-types writes it.
fn timestamp(wire: &[u8], out: &mut Vec<u8>) -> Walk {
    // 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    const MIN: i64 = -62_135_596_800;
    const MAX: i64 = 253_402_300_799;
    let (mut seconds, mut nanos) = (None, None);
    let mut r = Reader(wire);
    while !r.is_empty() {
        let slot = match r.tag()? {
            (1, VARINT) => &mut seconds,
            (2, VARINT) => &mut nanos,
            _ => return Err(Fallback),
        };
        if slot.is_some() {
            return Err(Fallback);
        }
        *slot = Some(r.varint()?);
    }
    let seconds = seconds.unwrap_or(0) as i64;
    let nanos = nanos.unwrap_or(0) as i32;
    if !(MIN..=MAX).contains(&seconds) || !(0..1_000_000_000).contains(&nanos) {
        return Err(Fallback);
    }
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut text = [0u8; 32];
    let mut n = 0;
    let mut put = |digits: u32, v: u32| {
        let mut v = v;
        for i in (0..digits as usize).rev() {
            text[n + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        n += digits as usize;
    };
    put(4, year as u32);
    let mut fields = [
        (b'-', month),
        (b'-', day),
        (b'T', (secs / 3600) as u32),
        (b':', (secs / 60 % 60) as u32),
        (b':', (secs % 60) as u32),
    ];
    out.push(b'"');
    out.extend_from_slice(&text[..4]);
    for (sep, v) in &mut fields {
        out.push(*sep);
        out.push(b'0' + (*v / 10) as u8);
        out.push(b'0' + (*v % 10) as u8);
    }
    let nanos = nanos as u32;
    let (digits, value) = if nanos == 0 {
        (0, 0)
    } else if nanos.is_multiple_of(1_000_000) {
        (3, nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        (6, nanos / 1_000)
    } else {
        (9, nanos)
    };
    if digits > 0 {
        out.push(b'.');
        let mut frac = [0u8; 9];
        let mut v = value;
        for i in (0..digits).rev() {
            frac[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&frac[..digits]);
    }
    out.extend_from_slice(b"Z\"");
    Ok(())
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A well-known type `prost-reflect` writes: decoded for this field alone.
fn delegate(descriptor: &MessageDescriptor, wire: &[u8], out: &mut Vec<u8>) -> Walk {
    let message = DynamicMessage::decode(descriptor.clone(), wire).map_err(|_| Fallback)?;
    message
        .serialize_with_options(
            &mut serde_json::Serializer::new(&mut *out),
            &SerializeOptions::new().skip_default_fields(false),
        )
        .map_err(|_| Fallback)
}

/// A cursor over wire bytes.
#[derive(Clone, Copy)]
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn varint(&mut self) -> Walk<u64> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    return Err(Fallback);
                }
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(Fallback)
    }

    fn tag(&mut self) -> Walk<(u32, u32)> {
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| Fallback)?;
        if number == 0 {
            return Err(Fallback);
        }
        Ok((number, (tag & 7) as u32))
    }

    fn fixed32(&mut self) -> Walk<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>().ok_or(Fallback)?;
        self.0 = rest;
        Ok(u32::from_le_bytes(*head))
    }

    fn fixed64(&mut self) -> Walk<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>().ok_or(Fallback)?;
        self.0 = rest;
        Ok(u64::from_le_bytes(*head))
    }

    fn bytes(&mut self) -> Walk<&'a [u8]> {
        let len = usize::try_from(self.varint()?).map_err(|_| Fallback)?;
        if len > self.0.len() {
            return Err(Fallback);
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    /// Skips a value of an unknown field; groups are left to the general path.
    fn skip(&mut self, wire_type: u32) -> Walk {
        match wire_type {
            VARINT => self.varint().map(drop),
            I64 => self.fixed64().map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.fixed32().map(drop),
            _ => Err(Fallback),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The walk against `prost-reflect`'s serializer, on messages with
    //! every kind of field (`tests/proto/conformance/v1/kinds.proto`):
    //! random canonical messages must take the walk and come out byte for
    //! byte the same; damaged and reordered bytes may fall back, but what
    //! the walk writes must always equal what the general path writes.

    use prost::Message as _;
    use prost_reflect::{DescriptorPool, MapKey as Key, Value};

    use super::*;

    fn pool() -> DescriptorPool {
        crate::test_pool("conformance/v1/kinds.proto")
    }

    /// A small deterministic generator (xorshift), so every run checks the
    /// same messages and a failure names its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
    }

    const STRINGS: &[&str] = &[
        "",
        "plain",
        "quote \" and backslash \\",
        "control \u{1} \n \t",
        "ünïcödé ✓ 🦀",
        "</script>",
    ];
    const FLOATS: &[f64] = &[
        // -0.0 is left out: a singular field holding it is not encoded
        // (it equals the default), so the message would not round-trip.
        0.0,
        1.5,
        -2.25,
        1e300,
        5e-324,
        0.1,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];

    fn scalar(rng: &mut Rng, kind: &Kind, depth: u32) -> Value {
        let big = |rng: &mut Rng| match rng.below(4) {
            0 => 0,
            1 => rng.next(),
            2 => rng.below(300),
            _ => u64::MAX - rng.below(3),
        };
        match kind {
            Kind::Double => Value::F64(FLOATS[rng.below(FLOATS.len() as u64) as usize]),
            Kind::Float => Value::F32(FLOATS[rng.below(FLOATS.len() as u64) as usize] as f32),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(big(rng) as i32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(big(rng) as i64),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(big(rng) as u32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(big(rng)),
            Kind::Bool => Value::Bool(rng.chance(2)),
            Kind::String => Value::String(STRINGS[rng.below(STRINGS.len() as u64) as usize].into()),
            Kind::Bytes => {
                let n = rng.below(7) as usize;
                Value::Bytes((0..n).map(|_| rng.next() as u8).collect::<Vec<_>>().into())
            }
            // Unknown enum numbers (7) are written as numbers.
            Kind::Enum(_) => Value::EnumNumber([0, 1, 2, 7][rng.below(4) as usize]),
            Kind::Message(m) => Value::Message(message(rng, m, depth + 1)),
        }
    }

    fn message(rng: &mut Rng, desc: &MessageDescriptor, depth: u32) -> DynamicMessage {
        let mut m = DynamicMessage::new(desc.clone());
        match desc.full_name() {
            "google.protobuf.Timestamp" => {
                // Now and then out of range: both paths must refuse it.
                let seconds = match rng.below(64) {
                    0 => -62_135_596_800,
                    1 => 253_402_300_799,
                    2 => 253_402_300_800,
                    _ => rng.below(4_000_000_000) as i64 - 1_000_000_000,
                };
                let nanos =
                    [0, 1_000_000, 123_000, 123_456_789, 999_999_999][rng.below(5) as usize];
                m.set_field_by_number(1, Value::I64(seconds));
                m.set_field_by_number(2, Value::I32(nanos));
                return m;
            }
            "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue"
                if depth > 2 =>
            {
                return m;
            }
            _ => {}
        }
        if depth > 2 {
            return m;
        }
        for field in desc.fields() {
            if !rng.chance(2) {
                continue;
            }
            let value = if field.is_map() {
                let Kind::Message(entry) = field.kind() else {
                    continue;
                };
                let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
                let mut map = std::collections::HashMap::new();
                for _ in 0..rng.below(3) {
                    let key = match scalar(rng, &kf.kind(), depth) {
                        Value::String(s) => Key::String(s),
                        Value::I64(v) => Key::I64(v),
                        Value::U32(v) => Key::U32(v),
                        Value::Bool(v) => Key::Bool(v),
                        _ => continue,
                    };
                    map.insert(key, scalar(rng, &vf.kind(), depth));
                }
                Value::Map(map)
            } else if field.is_list() {
                Value::List(
                    (0..rng.below(4))
                        .map(|_| scalar(rng, &field.kind(), depth))
                        .collect(),
                )
            } else {
                scalar(rng, &field.kind(), depth)
            };
            m.set_field(&field, value);
        }
        m
    }

    /// The transcoder's options: defaults written.
    fn options() -> SerializeOptions {
        SerializeOptions::new().skip_default_fields(false)
    }

    /// What the general path writes for these bytes (or `None` when it
    /// refuses them).
    fn general(desc: &MessageDescriptor, wire: &[u8]) -> Option<Vec<u8>> {
        let decoded = DynamicMessage::decode(desc.clone(), wire).ok()?;
        let mut out = serde_json::Serializer::new(Vec::new());
        decoded.serialize_with_options(&mut out, &options()).ok()?;
        Some(out.into_inner())
    }

    fn walk(plans: &Plans, plan: usize, wire: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        plans.write(plan, wire, &mut out).ok().map(|()| out)
    }

    /// Where two outputs part, with some context.
    fn difference(got: &[u8], expected: &[u8]) -> String {
        let at = got
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        let from = at.saturating_sub(60);
        format!(
            "they part at byte {at}: wrote …{}… where prost-reflect writes …{}…",
            String::from_utf8_lossy(&got[from..(at + 60).min(got.len())]),
            String::from_utf8_lossy(&expected[from..(at + 60).min(expected.len())]),
        )
    }

    fn text(bytes: &Option<Vec<u8>>) -> String {
        bytes.as_ref().map_or("(refused)".into(), |b| {
            String::from_utf8_lossy(b).into_owned()
        })
    }

    #[test]
    fn canonical_messages_are_written_as_prost_reflect_writes_them() {
        let pool = pool();
        let desc = pool
            .get_message_by_name("conformance.v1.Kinds")
            .expect("Kinds");
        let mut plans = Plans::default();
        let plan = plans.add(&desc);
        let (mut walked, mut refused) = (0, 0);
        for seed in 1..=1500u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let original = message(&mut rng, &desc, 0);
            let wire = original.encode_to_vec();
            // The same HashMap is encoded and serialized, so map entries
            // come in the same order on both sides.
            let mut expected = serde_json::Serializer::new(Vec::new());
            let expected = original
                .serialize_with_options(&mut expected, &options())
                .ok()
                .map(|()| expected.into_inner());
            let got = walk(&plans, plan, &wire);
            match (&got, &expected) {
                (Some(g), Some(e)) => {
                    assert!(g == e, "seed {seed}: {}", difference(g, e));
                    walked += 1;
                }
                (None, None) => refused += 1,
                (Some(_), None) => panic!(
                    "seed {seed}: the walk wrote {} where prost-reflect refuses",
                    text(&got)
                ),
                // A canonical encoding must not fall back, or the fast
                // path is not taken in practice.
                (None, Some(e)) => panic!(
                    "seed {seed}: the walk fell back on canonical bytes; expected {}",
                    String::from_utf8_lossy(e)
                ),
            }
        }
        assert!(
            walked > 800,
            "only {walked} messages walked ({refused} refused)"
        );
        assert!(refused > 0, "no out-of-range timestamp was generated");
    }

    #[test]
    fn any_bytes_either_fall_back_or_match_the_general_path() {
        let pool = pool();
        let desc = pool
            .get_message_by_name("conformance.v1.Kinds")
            .expect("Kinds");
        let mut plans = Plans::default();
        let plan = plans.add(&desc);
        let (mut same, mut fell_back) = (0, 0);
        for seed in 1..=1500u64 {
            let mut rng = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
            let mut wire = message(&mut rng, &desc, 0).encode_to_vec();
            match rng.below(5) {
                // Damaged: a byte changed, or cut short.
                0 if !wire.is_empty() => {
                    let i = rng.below(wire.len() as u64) as usize;
                    wire[i] ^= 1 << rng.below(8);
                }
                1 => wire.truncate(rng.below(wire.len() as u64 + 1) as usize),
                // Reordered or repeated: a second message appended merges
                // into the first (fields out of order, singular fields twice).
                2 => wire.extend(message(&mut rng, &desc, 0).encode_to_vec()),
                // An unknown field in between.
                3 => wire.extend([0xf8, 0x07, 0x2a]), // field 127, varint 42
                _ => {}
            }
            let got = walk(&plans, plan, &wire);
            let expected = general(&desc, &wire);
            match got {
                None => fell_back += 1,
                Some(ref g) => {
                    // Map entries decoded into a HashMap come out in its
                    // order; compare as JSON values.
                    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
                    let e = expected.as_deref().unwrap_or(b"");
                    assert!(
                        expected.is_some() && parse(g) == parse(e),
                        "seed {seed}: {}",
                        if expected.is_some() {
                            difference(g, e)
                        } else {
                            format!(
                                "the general path refuses what the walk wrote: {}",
                                text(&got)
                            )
                        }
                    );
                    same += 1;
                }
            }
        }
        assert!(
            same > 300 && fell_back > 300,
            "{same} walked, {fell_back} fell back"
        );
    }

    #[test]
    fn timestamps_are_written_like_prost_types() {
        for (seconds, nanos) in [
            (0i64, 0i32),
            (-1, 999_999_999),
            (951_782_400, 0),       // 2000-02-29
            (4_107_542_400, 1_000), // 2100-03-01
            (-62_135_596_800, 0),
            (253_402_300_799, 999_999_999),
            (1_796_000_000, 120_000_000),
        ] {
            let ts = prost_types::Timestamp { seconds, nanos };
            let mut out = Vec::new();
            timestamp(&ts.encode_to_vec(), &mut out).expect("in range");
            assert_eq!(String::from_utf8_lossy(&out), format!("\"{ts}\""));
        }
    }
}
