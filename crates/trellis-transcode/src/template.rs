//! `google.api.http` path templates:
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `{id}` is `{id=*}`: one segment. `**` matches the rest of the path and
//! may only come last.

use std::{fmt, sync::Arc};

/// One segment pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments, last only.
    Rest,
}

/// A variable: which field, over which segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Var {
    /// The dotted field path, e.g. `user.id`.
    pub(crate) field: Arc<str>,
    start: usize,
    end: usize,
}

/// The variables a matched path bound: (field path, decoded value).
pub type PathVars = Vec<(Arc<str>, String)>;

/// A parsed `google.api.http` path template, e.g. `/v1/{name=shops/*}/items/{id}:undelete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pub(crate) segs: Vec<Seg>,
    pub(crate) vars: Vec<Var>,
    pub(crate) verb: Option<String>,
    source: String,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub(crate) String);

impl std::error::Error for TemplateError {}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PathTemplate {
    /// Parses a template; the error names what is wrong with it.
    pub fn parse(template: &str) -> Result<PathTemplate, TemplateError> {
        let err = |why: &str| TemplateError(format!("path template {template:?}: {why}"));
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| err("must start with /"))?;
        // The verb is after the last ':' outside braces.
        let mut depth = 0usize;
        let mut verb_at = None;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.checked_sub(1).ok_or_else(|| err("unbalanced }"))?,
                ':' if depth == 0 => verb_at = Some(i),
                _ => {}
            }
        }
        if depth != 0 {
            return Err(err("unbalanced {"));
        }
        let (body, verb) = match verb_at {
            Some(i) => (&rest[..i], Some(rest[i + 1..].to_owned())),
            None => (rest, None),
        };
        if verb
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains('/'))
        {
            return Err(err("the verb after ':' must be one literal"));
        }

        let mut segs = Vec::new();
        let mut vars = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or_else(|| err("unbalanced {"))?;
                let (field, pattern) = match inner[..close].split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (&inner[..close], "*"),
                };
                if field.is_empty() || !field.split('.').all(is_ident) {
                    return Err(err(&format!("{field:?} is not a field path")));
                }
                if vars.iter().any(|v: &Var| &*v.field == field) {
                    return Err(err(&format!("{field} is bound twice")));
                }
                let start = segs.len();
                for p in pattern.split('/') {
                    segs.push(segment(p).ok_or_else(|| err(&format!("{p:?} is not a segment")))?);
                }
                vars.push(Var {
                    field: field.into(),
                    start,
                    end: segs.len(),
                });
                chars = &inner[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let piece = &chars[..end];
                if piece.contains(['{', '}', '=']) {
                    return Err(err(&format!("{piece:?} is not a segment")));
                }
                segs.push(
                    segment(piece).ok_or_else(|| err(&format!("{piece:?} is not a segment")))?,
                );
                chars = &chars[end..];
            }
            if let Some(after) = chars.strip_prefix('/') {
                if after.is_empty() {
                    return Err(err("ends with /"));
                }
                chars = after;
            } else if !chars.is_empty() {
                return Err(err("a variable must fill whole segments"));
            }
        }
        if segs.iter().rev().skip(1).any(|s| *s == Seg::Rest) {
            return Err(err("** may only come last"));
        }
        Ok(PathTemplate {
            segs,
            vars,
            verb,
            source: template.to_owned(),
        })
    }

    /// The template as written, for route labels and OpenAPI.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether both match exactly the same paths (variable names aside).
    pub fn same_shape(&self, other: &PathTemplate) -> bool {
        self.segs == other.segs && self.verb == other.verb
    }

    /// The field paths its variables bind, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|v| &*v.field)
    }

    /// How specific the template is: more literal segments first, then a
    /// verb, then fewer `**`.
    pub fn specificity(&self) -> (usize, bool, bool) {
        let literals = self
            .segs
            .iter()
            .filter(|s| matches!(s, Seg::Literal(_)))
            .count();
        (
            literals,
            self.verb.is_some(),
            !self.segs.contains(&Seg::Rest),
        )
    }

    /// Matches a request path (still percent-encoded) against this
    /// template alone: `None` when it does not match, else the variables
    /// (an error when a bound segment does not decode). A [`RouteTable`]
    /// matches many templates at once.
    ///
    /// [`RouteTable`]: crate::RouteTable
    pub fn matches(&self, path: &str) -> Option<Result<PathVars, String>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        let open = self.segs.last() == Some(&Seg::Rest);
        let fixed = if open {
            self.segs.len() - 1
        } else {
            self.segs.len()
        };
        if parts.len() < fixed || (!open && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segs.iter().zip(&parts) {
            match seg {
                Seg::Literal(l) if l != part => return None,
                Seg::One if part.is_empty() => return None,
                _ => {}
            }
        }
        Some(self.bind(&parts))
    }

    /// The variables of a path whose segments (verb removed) are known to
    /// match; an error names a segment that does not decode.
    pub(crate) fn bind(&self, parts: &[&str]) -> Result<PathVars, String> {
        let open = self.segs.last() == Some(&Seg::Rest);
        let mut bound = Vec::with_capacity(self.vars.len());
        for var in &self.vars {
            let end = if open && var.end == self.segs.len() {
                parts.len()
            } else {
                var.end
            };
            let segments = parts.get(var.start..end).unwrap_or_default();
            // A one-segment variable decodes everything; a multi-segment one
            // keeps its slashes (RFC 6570 reserved expansion).
            let value = if var.end - var.start == 1 && !(open && var.end == self.segs.len()) {
                decoded(segments.first().copied().unwrap_or(""))?
            } else {
                segments
                    .iter()
                    .map(|s| decoded(s))
                    .collect::<Result<Vec<_>, _>>()?
                    .join("/")
            };
            bound.push((var.field.clone(), value));
        }
        Ok(bound)
    }
}

/// [`decode`], or an error naming the segment (a bounded prefix of it).
fn decoded(segment: &str) -> Result<String, String> {
    decode(segment).ok_or_else(|| {
        format!(
            "the path segment {} is not percent-encoded UTF-8",
            trellis_core::excerpt(segment)
        )
    })
}

fn segment(p: &str) -> Option<Seg> {
    match p {
        "*" => Some(Seg::One),
        "**" => Some(Seg::Rest),
        "" => None,
        l if l.contains(['*', '{', '}', '?', '#']) => None,
        l => Some(Seg::Literal(l.to_owned())),
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Percent-decodes one segment; `None` if it is not valid UTF-8 after.
pub(crate) fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, p: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t)
            .unwrap()
            .matches(p)?
            .ok()
            .map(|v| v.into_iter().map(|(f, v)| (f.to_string(), v)).collect())
    }

    fn vars(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn matches_the_forms_of_the_grammar() {
        assert_eq!(m("/v1/users", "/v1/users"), vars(&[]));
        assert_eq!(m("/v1/users", "/v1/users/x"), None);
        assert_eq!(m("/v1/users/{id}", "/v1/users/42"), vars(&[("id", "42")]));
        assert_eq!(
            m("/v1/users/{id}", "/v1/users/"),
            None,
            "an empty segment is no id"
        );
        assert_eq!(
            m("/v1/users/{user.id}", "/v1/users/a%20b"),
            vars(&[("user.id", "a b")])
        );
        assert_eq!(
            m("/v1/{name=users/*}", "/v1/users/7"),
            vars(&[("name", "users/7")])
        );
        assert_eq!(m("/v1/{name=users/*}", "/v1/shops/7"), None);
        assert_eq!(
            m("/v1/{parent=shops/*}/items/{id}", "/v1/shops/s1/items/i9"),
            vars(&[("parent", "shops/s1"), ("id", "i9")])
        );
        assert_eq!(
            m("/v1/files/{path=**}", "/v1/files/a/b/c.txt"),
            vars(&[("path", "a/b/c.txt")])
        );
        assert_eq!(m("/v1/files/{path=**}", "/v1/files"), vars(&[("path", "")]));
        assert_eq!(m("/v1/*/x", "/v1/anything/x"), vars(&[]));
        assert_eq!(
            m("/v1/users/{id}:undelete", "/v1/users/5:undelete"),
            vars(&[("id", "5")])
        );
        assert_eq!(m("/v1/users/{id}:undelete", "/v1/users/5"), None);
        assert_eq!(
            m("/v1/users/{id}", "/v1/users/a%2Fb"),
            vars(&[("id", "a/b")])
        );
        let bad = PathTemplate::parse("/v1/users/{id}").unwrap();
        for path in ["/v1/users/%zz", "/v1/users/%FF", "/v1/users/%C3"] {
            let err = bad.matches(path).expect("the shape matches").unwrap_err();
            assert!(err.contains("not percent-encoded UTF-8"), "{path}: {err}");
        }
    }

    #[test]
    fn rejects_what_the_grammar_does_not_allow() {
        for bad in [
            "v1/users",
            "/v1/{id",
            "/v1/id}",
            "/v1/**/x",
            "/v1/{a.}",
            "/v1/{id}{name}",
            "/v1/",
            "/v1/{id}/{id}",
            "/v1:",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn literal_segments_are_more_specific() {
        let a = PathTemplate::parse("/v1/users/{id}").unwrap();
        let b = PathTemplate::parse("/v1/users/me").unwrap();
        assert!(b.specificity() > a.specificity());
    }
}
