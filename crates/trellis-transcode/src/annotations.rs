//! The one reader of the proto annotations the REST face lives by:
//! `google.api.http` (routes), `google.api.field_behavior` and
//! `buf.validate.field` (request rules). The transcoder, validation and the
//! OpenAPI document all read them through here, so they cannot disagree.

use http::Method;
use prost_reflect::{DynamicMessage, FieldDescriptor, MethodDescriptor, Value};

/// `google.api.field_behavior = REQUIRED`.
pub const REQUIRED: i32 = 2;
/// `google.api.field_behavior = OUTPUT_ONLY`.
pub const OUTPUT_ONLY: i32 = 3;

/// One `google.api.http` binding of an RPC (the rule itself or one of its
/// `additional_bindings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBinding {
    /// The HTTP method (`custom` kinds included).
    pub method: Method,
    /// The path template as written.
    pub path: String,
    /// `body`: empty, `*` or a top-level field name.
    pub body: String,
    /// `response_body`: empty or a top-level field name of the response.
    pub response_body: String,
}

/// Every `google.api.http` binding of `rpc`, the main rule first; none when
/// the method is not annotated. `Err` names what is malformed.
pub fn http_bindings(rpc: &MethodDescriptor) -> Result<Vec<HttpBinding>, String> {
    let Some(http) = rpc.parent_pool().get_extension_by_name("google.api.http") else {
        return Ok(Vec::new());
    };
    let options = rpc.options();
    if !options.has_extension(&http) {
        return Ok(Vec::new());
    }
    let Value::Message(rule) = options.get_extension(&http).into_owned() else {
        return Ok(Vec::new());
    };
    let mut rules = vec![rule.clone()];
    if let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref() {
        rules.extend(more.iter().filter_map(|v| v.as_message().cloned()));
    }
    rules.iter().map(binding).collect()
}

fn binding(rule: &DynamicMessage) -> Result<HttpBinding, String> {
    let text = |m: &DynamicMessage, name: &str| {
        m.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let mut pattern = None;
    for (field, method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(field) {
            pattern = Some((method, text(rule, field)));
        }
    }
    if rule.has_field_by_name("custom")
        && let Some(Value::Message(custom)) = rule.get_field_by_name("custom").as_deref()
    {
        let kind = text(custom, "kind");
        let method = Method::from_bytes(kind.as_bytes())
            .map_err(|_| format!("custom kind {kind:?} is not an HTTP method"))?;
        pattern = Some((method, text(custom, "path")));
    }
    let (method, path) = pattern.ok_or("google.api.http has no pattern")?;
    Ok(HttpBinding {
        method,
        path,
        body: text(rule, "body"),
        response_body: text(rule, "response_body"),
    })
}

/// The `google.api.field_behavior` values on `field` (`REQUIRED`,
/// `OUTPUT_ONLY`, ...).
pub fn field_behaviors(field: &FieldDescriptor) -> Vec<i32> {
    let Some(ext) = field
        .parent_pool()
        .get_extension_by_name("google.api.field_behavior")
    else {
        return Vec::new();
    };
    let options = field.options();
    if !options.has_extension(&ext) {
        return Vec::new();
    }
    match options.get_extension(&ext).as_ref() {
        Value::List(values) => values.iter().filter_map(Value::as_enum_number).collect(),
        other => other.as_enum_number().into_iter().collect(),
    }
}

/// A number from a rule or a field, compared exactly for integers.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub enum Num {
    /// Any integer type.
    I(i128),
    /// `float` or `double`.
    F(f64),
}

impl Num {
    /// The number in a field value, if it is one.
    pub fn of(v: &Value) -> Option<Num> {
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

    /// Orders two numbers; integers exactly, anything else as floats.
    pub fn compare(self, other: Num) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Num::I(a), Num::I(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    /// The number as a float.
    pub fn as_f64(self) -> f64 {
        match self {
            Num::I(n) => n as f64,
            Num::F(f) => f,
        }
    }

    /// The number as written in a message.
    pub fn show(self) -> String {
        match self {
            Num::I(n) => n.to_string(),
            Num::F(f) => f.to_string(),
        }
    }

    /// The number as JSON.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Num::I(n) => i64::try_from(n)
                .map(serde_json::Value::from)
                .unwrap_or_else(|_| serde_json::Value::from(n as f64)),
            Num::F(f) => serde_json::Value::from(f),
        }
    }
}

/// One `buf.validate.field` rule Trellis checks.
#[derive(Debug, Clone)]
pub enum Rule {
    /// `string.const`.
    StrConst(String),
    /// `string.len` (characters) or `bytes.len`.
    Len(u64),
    /// `string.min_len` (characters) or `bytes.min_len`.
    MinLen(u64),
    /// `string.max_len` (characters) or `bytes.max_len`.
    MaxLen(u64),
    /// `string.min_bytes`.
    MinBytes(u64),
    /// `string.max_bytes`.
    MaxBytes(u64),
    /// `string.pattern` (RE2 syntax, as the `regex` crate reads it).
    Pattern(regex::Regex),
    /// `string.prefix`.
    Prefix(String),
    /// `string.suffix`.
    Suffix(String),
    /// `string.contains`.
    Contains(String),
    /// `string.in`.
    StrIn(Vec<String>),
    /// `string.not_in`.
    StrNotIn(Vec<String>),
    /// A number type's `const`.
    NumConst(Num),
    /// `lt`.
    Lt(Num),
    /// `lte`.
    Lte(Num),
    /// `gt`.
    Gt(Num),
    /// `gte`.
    Gte(Num),
    /// A number type's `in`.
    NumIn(Vec<Num>),
    /// A number type's `not_in`.
    NumNotIn(Vec<Num>),
    /// `enum.defined_only`.
    DefinedOnly,
    /// `repeated.min_items`.
    MinItems(u64),
    /// `repeated.max_items`.
    MaxItems(u64),
    /// `repeated.unique`.
    Unique,
}

/// The request rules on one field.
#[derive(Debug, Clone, Default)]
pub struct FieldRules {
    /// `field_behavior = REQUIRED` or `(buf.validate.field).required`.
    pub required: bool,
    /// The value rules.
    pub rules: Vec<Rule>,
}

impl FieldRules {
    /// Whether there is anything to check.
    pub fn is_empty(&self) -> bool {
        !self.required && self.rules.is_empty()
    }
}

/// The rules on `field`. `Err` names a rule that cannot be used (a
/// `pattern` that is not a regular expression).
pub fn field_rules(field: &FieldDescriptor) -> Result<FieldRules, String> {
    let mut out = FieldRules {
        required: field_behaviors(field).contains(&REQUIRED),
        rules: Vec::new(),
    };
    let Some(ext) = field
        .parent_pool()
        .get_extension_by_name("buf.validate.field")
    else {
        return Ok(out);
    };
    let options = field.options();
    if !options.has_extension(&ext) {
        return Ok(out);
    }
    let Value::Message(rules) = options.get_extension(&ext).into_owned() else {
        return Ok(out);
    };
    out.required |= rules
        .get_field_by_name("required")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    out.rules = read_rules(&rules)?;
    Ok(out)
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
