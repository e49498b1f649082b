//! A route table for `google.api.http` templates: a trie over path
//! segments, so a lookup costs the depth of the path, not the number of
//! routes. Each node branches on literal segments (a hash map), on `*`
//! (one segment) and ends `**` templates (the rest of the path); a verb
//! (`:undelete`) is tried on the last segment. Every template that matches
//! is a candidate; the most specific one for the request's method wins
//! (more literal segments, then a verb, then no `**`), and a path that
//! matches only under other methods is a 405 naming them.
//!
//! The table is generic over what a route carries: the transcoder keeps
//! its RPC there, the gateway its upstream.
//!
//! ```
//! use http::Method;
//! use trellis_transcode::{Lookup, PathTemplate, RouteTable};
//!
//! let mut table = RouteTable::new();
//! table.insert(Method::GET, PathTemplate::parse("/v1/users/{id}")?, "get user")?;
//! table.insert(Method::GET, PathTemplate::parse("/v1/users/me")?, "me")?;
//! match table.lookup(&Method::GET, "/v1/users/42") {
//!     Lookup::Found(found) => {
//!         assert_eq!(*found.value, "get user");
//!         assert_eq!(&**found.template, "/v1/users/{id}");
//!         assert_eq!(found.vars[0].1, "42");
//!     }
//!     other => panic!("{other:?}"),
//! }
//! assert!(matches!(table.lookup(&Method::GET, "/v1/users/me"), Lookup::Found(f) if *f.value == "me"));
//! assert!(matches!(table.lookup(&Method::POST, "/v1/users/me"), Lookup::MethodNotAllowed(_)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasherDefault, Hasher},
    sync::Arc,
};

use http::Method;

use crate::template::{PathTemplate, PathVars, Seg};

/// Routes by HTTP method and path template.
pub struct RouteTable<T> {
    root: Node,
    entries: Vec<Entry<T>>,
}

struct Entry<T> {
    method: Method,
    template: PathTemplate,
    label: Arc<str>,
    value: T,
}

#[derive(Default)]
struct Node {
    /// Hashed with FNV-1a: the keys are the configured literals, which a
    /// request cannot add to, so a fast hash costs no flooding risk.
    literal: HashMap<Box<str>, Node, BuildHasherDefault<Fnv>>,
    one: Option<Box<Node>>,
    /// Templates ending here.
    end: Vec<usize>,
    /// Templates whose `**` starts here (it matches zero or more segments).
    rest: Vec<usize>,
}

/// What a lookup found.
pub enum Lookup<'a, T> {
    /// The route for this method and path.
    Found(Found<'a, T>),
    /// The path matches only under these methods (answer 405 with `Allow`).
    MethodNotAllowed(Vec<Method>),
    /// No template matches the path.
    NotFound,
    /// A template matches, but a bound segment does not decode (`%FF`):
    /// the request is malformed (answer 400). The text names the segment.
    BadPath(String),
}

impl<T> fmt::Debug for Lookup<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lookup::Found(found) => write!(f, "Found({})", found.template),
            Lookup::MethodNotAllowed(m) => write!(f, "MethodNotAllowed({m:?})"),
            Lookup::NotFound => f.write_str("NotFound"),
            Lookup::BadPath(why) => write!(f, "BadPath({why})"),
        }
    }
}

/// A matched route.
pub struct Found<'a, T> {
    /// What the route carries.
    pub value: &'a T,
    /// The template as written: a bounded label for metrics and traces.
    pub template: &'a Arc<str>,
    /// The variables the path bound, decoded.
    pub vars: PathVars,
}

/// Why a route could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method} {template} is already routed")]
pub struct DuplicateRoute {
    /// The method.
    pub method: Method,
    /// The template.
    pub template: String,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            root: Node::default(),
            entries: Vec::new(),
        }
    }
}

impl<T> fmt::Debug for RouteTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl<T> RouteTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every route: method, template and value, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&Method, &PathTemplate, &T)> {
        self.entries
            .iter()
            .map(|e| (&e.method, &e.template, &e.value))
    }

    /// Adds a route. The same method and template shape twice is an error
    /// (two RPCs cannot own one REST route; `{id}` and `{name}` in the same
    /// place are the same shape).
    pub fn insert(
        &mut self,
        method: Method,
        template: PathTemplate,
        value: T,
    ) -> Result<(), DuplicateRoute> {
        let index = self.entries.len();
        let mut node = &mut self.root;
        for seg in &template.segs {
            node = match seg {
                Seg::Literal(l) => node.literal.entry(l.as_str().into()).or_default(),
                Seg::One => node.one.get_or_insert_with(Box::default),
                Seg::Rest => break,
            };
        }
        let ending = if template.segs.last() == Some(&Seg::Rest) {
            &mut node.rest
        } else {
            &mut node.end
        };
        // Templates of the same shape end on the same node: the duplicate
        // check looks there only, so adding n routes is not O(n²).
        let entries = &self.entries;
        if ending
            .iter()
            .any(|&i| entries[i].method == method && entries[i].template.same_shape(&template))
        {
            return Err(DuplicateRoute {
                method,
                template: template.source().to_owned(),
            });
        }
        ending.push(index);
        self.entries.push(Entry {
            method,
            label: template.source().into(),
            template,
            value,
        });
        Ok(())
    }

    /// The route for `method` and `path` (the request's path, still
    /// percent-encoded, without the query).
    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_, T> {
        let Some(rest) = path.strip_prefix('/') else {
            return Lookup::NotFound;
        };
        // Up to 16 segments on the stack; longer paths allocate.
        let mut inline = [""; 16];
        let spilled: Vec<&str>;
        let parts: &[&str] = if rest.is_empty() {
            &[]
        } else {
            let mut n = 0;
            let mut over = false;
            for part in rest.split('/') {
                if n == inline.len() {
                    over = true;
                    break;
                }
                inline[n] = part;
                n += 1;
            }
            if over {
                spilled = rest.split('/').collect();
                &spilled
            } else {
                &inline[..n]
            }
        };
        // Templates without a verb match the path as it is; templates with
        // one match it with the last segment's `:verb` taken off. The most
        // specific for this method wins; between equals, the first added.
        let mut found = Vec::new();
        let mut best: Option<(usize, bool)> = None;
        let mut any = false;
        let mut consider = |i: usize, with_verb: bool, best: &mut Option<(usize, bool)>| {
            any = true;
            if self.entries[i].method != *method {
                return;
            }
            let better = best.is_none_or(|(b, _)| {
                let (new, old) = (&self.entries[i].template, &self.entries[b].template);
                new.specificity() > old.specificity()
                    || (new.specificity() == old.specificity() && i < b)
            });
            if better {
                *best = Some((i, with_verb));
            }
        };
        self.root.walk(parts, 0, &mut found);
        for &i in &found {
            if self.entries[i].template.verb.is_none() {
                consider(i, false, &mut best);
            }
        }
        let mut verb_parts = Vec::new();
        let verb = parts.last().and_then(|last| last.rsplit_once(':'));
        if let Some((head, verb)) = verb {
            verb_parts.extend_from_slice(&parts[..parts.len() - 1]);
            verb_parts.push(head);
            found.clear();
            self.root.walk(&verb_parts, 0, &mut found);
            for &i in &found {
                if self.entries[i].template.verb.as_deref() == Some(verb) {
                    consider(i, true, &mut best);
                }
            }
        }
        match best {
            Some((index, with_verb)) => {
                let entry = &self.entries[index];
                let bound = if with_verb { &verb_parts[..] } else { parts };
                match entry.template.bind(bound) {
                    Ok(vars) => Lookup::Found(Found {
                        value: &entry.value,
                        template: &entry.label,
                        vars,
                    }),
                    Err(why) => Lookup::BadPath(why),
                }
            }
            None if !any => Lookup::NotFound,
            None => {
                // The path matched under other methods: name them (the
                // uncommon case, so it walks again rather than keep a list).
                let mut allowed: Vec<Method> = Vec::new();
                let mut add = |i: usize| {
                    let m = &self.entries[i].method;
                    if !allowed.contains(m) {
                        allowed.push(m.clone());
                    }
                };
                found.clear();
                self.root.walk(parts, 0, &mut found);
                for &i in &found {
                    if self.entries[i].template.verb.is_none() {
                        add(i);
                    }
                }
                if let Some((_, verb)) = verb {
                    found.clear();
                    self.root.walk(&verb_parts, 0, &mut found);
                    for &i in &found {
                        if self.entries[i].template.verb.as_deref() == Some(verb) {
                            add(i);
                        }
                    }
                }
                Lookup::MethodNotAllowed(allowed)
            }
        }
    }
}

impl<T> RouteTable<T> {
    /// Every route for `method` whose template matches `path`, most
    /// specific first (between equals, the first added), each with its
    /// variables — for a router that filters further (hosts, headers) and
    /// falls through to the next candidate. A candidate whose bound segment
    /// does not decode is left out.
    pub fn lookup_all(&self, method: &Method, path: &str) -> Vec<Found<'_, T>> {
        let Some(rest) = path.strip_prefix('/') else {
            return Vec::new();
        };
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let verb_parts = verb_parts(&parts);
        self.ordered(method, &parts, verb_parts.as_ref())
            .into_iter()
            .filter_map(|(i, with_verb)| {
                let entry = &self.entries[i];
                let bound = match (&verb_parts, with_verb) {
                    (Some((vp, _)), true) => &vp[..],
                    _ => &parts[..],
                };
                entry.template.bind(bound).ok().map(|vars| Found {
                    value: &entry.value,
                    template: &entry.label,
                    vars,
                })
            })
            .collect()
    }

    /// What every route for `method` whose template matches `path`
    /// carries, most specific first, without binding variables: the
    /// gateway's lookup, which needs the candidates and not the values.
    pub fn matching(&self, method: &Method, path: &str) -> Vec<&T> {
        let Some(rest) = path.strip_prefix('/') else {
            return Vec::new();
        };
        let mut inline = [""; 16];
        let spilled: Vec<&str>;
        let parts: &[&str] = if rest.is_empty() {
            &[]
        } else if rest.split('/').count() <= inline.len() {
            let mut n = 0;
            for part in rest.split('/') {
                inline[n] = part;
                n += 1;
            }
            &inline[..n]
        } else {
            spilled = rest.split('/').collect();
            &spilled
        };
        let verb_parts = verb_parts(parts);
        self.ordered(method, parts, verb_parts.as_ref())
            .into_iter()
            .map(|(i, _)| &self.entries[i].value)
            .collect()
    }

    /// The entries matching `parts` (and, for templates with a verb,
    /// `verb_parts`) under `method`, most specific first.
    fn ordered(
        &self,
        method: &Method,
        parts: &[&str],
        verb_parts: Option<&(Vec<&str>, &str)>,
    ) -> Vec<(usize, bool)> {
        let mut found = Vec::new();
        self.root.walk(parts, 0, &mut found);
        let mut matched: Vec<(usize, bool)> = found
            .iter()
            .filter(|&&i| {
                self.entries[i].template.verb.is_none() && self.entries[i].method == *method
            })
            .map(|&i| (i, false))
            .collect();
        if let Some((verb_parts, verb)) = verb_parts {
            found.clear();
            self.root.walk(verb_parts, 0, &mut found);
            matched.extend(
                found
                    .iter()
                    .filter(|&&i| {
                        self.entries[i].template.verb.as_deref() == Some(*verb)
                            && self.entries[i].method == *method
                    })
                    .map(|&i| (i, true)),
            );
        }
        if matched.len() > 1 {
            matched.sort_by(|&(a, _), &(b, _)| {
                let (ta, tb) = (&self.entries[a].template, &self.entries[b].template);
                tb.specificity().cmp(&ta.specificity()).then(a.cmp(&b))
            });
            matched.dedup_by_key(|(i, _)| *i);
        }
        matched
    }
}

/// The path with the last segment's `:verb` taken off, and the verb.
fn verb_parts<'a>(parts: &[&'a str]) -> Option<(Vec<&'a str>, &'a str)> {
    let (head, verb) = parts.last()?.rsplit_once(':')?;
    let mut out = parts[..parts.len() - 1].to_vec();
    out.push(head);
    Some((out, verb))
}

/// FNV-1a, for the short path segments of the literal maps.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Node {
    /// Every template matching `parts[i..]` from this node.
    fn walk(&self, parts: &[&str], i: usize, out: &mut Vec<usize>) {
        // `**` takes whatever is left, nothing included.
        out.extend_from_slice(&self.rest);
        let Some(part) = parts.get(i) else {
            out.extend_from_slice(&self.end);
            return;
        };
        if let Some(next) = self.literal.get(*part) {
            next.walk(parts, i + 1, out);
        }
        if let Some(next) = &self.one
            && !part.is_empty()
        {
            next.walk(parts, i + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str)]) -> RouteTable<usize> {
        let mut t = RouteTable::new();
        for (i, (method, template)) in routes.iter().enumerate() {
            t.insert(
                method.parse().unwrap(),
                PathTemplate::parse(template).unwrap(),
                i,
            )
            .unwrap();
        }
        t
    }

    fn found(t: &RouteTable<usize>, method: &str, path: &str) -> Option<(usize, Vec<String>)> {
        match t.lookup(&method.parse().unwrap(), path) {
            Lookup::Found(f) => Some((*f.value, f.vars.into_iter().map(|(_, v)| v).collect())),
            _ => None,
        }
    }

    #[test]
    fn lookup_all_lists_every_match_most_specific_first() {
        let t = table(&[
            ("GET", "/v1/{rest=**}"),
            ("GET", "/v1/users/{id}"),
            ("GET", "/v1/users/me"),
            ("POST", "/v1/users/me"),
            ("GET", "/v2/{rest=**}"),
        ]);
        let all: Vec<usize> = t
            .lookup_all(&Method::GET, "/v1/users/me")
            .iter()
            .map(|f| *f.value)
            .collect();
        assert_eq!(all, [2, 1, 0]);
        let values: Vec<usize> = t
            .matching(&Method::GET, "/v1/users/me")
            .into_iter()
            .copied()
            .collect();
        assert_eq!(values, all, "matching lists what lookup_all does, unbound");
        assert!(
            t.matching(&Method::GET, &format!("/v1{}", "/x".repeat(40)))
                .len()
                == 1
        );
        assert!(t.lookup_all(&Method::DELETE, "/v1/users/me").is_empty());
        assert!(t.lookup_all(&Method::GET, "/v3/x").is_empty());
    }

    #[test]
    fn the_most_specific_template_wins_whatever_the_order() {
        let routes = [
            ("GET", "/v1/users/{id}"),
            ("GET", "/v1/users/me"),
            ("GET", "/v1/{name=users/*}:undelete"),
            ("GET", "/v1/files/{path=**}"),
            ("GET", "/v1/files/readme"),
            ("POST", "/v1/users/{id}"),
        ];
        for reversed in [false, true] {
            let mut ordered = routes.to_vec();
            if reversed {
                ordered.reverse();
            }
            let t = table(&ordered);
            let at = |method: &str, template: &str| {
                ordered
                    .iter()
                    .position(|(m, t)| *m == method && *t == template)
                    .unwrap()
            };
            let index = |template: &str| at("GET", template);
            assert_eq!(
                found(&t, "GET", "/v1/users/42"),
                Some((index("/v1/users/{id}"), vec!["42".into()]))
            );
            assert_eq!(
                found(&t, "GET", "/v1/users/me"),
                Some((index("/v1/users/me"), vec![]))
            );
            assert_eq!(
                found(&t, "GET", "/v1/users/7:undelete"),
                Some((index("/v1/{name=users/*}:undelete"), vec!["users/7".into()]))
            );
            assert_eq!(
                found(&t, "GET", "/v1/files/a/b"),
                Some((index("/v1/files/{path=**}"), vec!["a/b".into()]))
            );
            assert_eq!(
                found(&t, "GET", "/v1/files"),
                Some((index("/v1/files/{path=**}"), vec!["".into()]))
            );
            assert_eq!(
                found(&t, "GET", "/v1/files/readme"),
                Some((index("/v1/files/readme"), vec![]))
            );
            assert_eq!(
                found(&t, "POST", "/v1/users/me"),
                Some((at("POST", "/v1/users/{id}"), vec!["me".into()]))
            );
        }
    }

    #[test]
    fn a_verb_less_template_keeps_a_colon_in_its_segment() {
        let t = table(&[("GET", "/v1/users/{id}")]);
        assert_eq!(
            found(&t, "GET", "/v1/users/a:b"),
            Some((0, vec!["a:b".into()]))
        );
    }

    #[test]
    fn misses_say_why() {
        let t = table(&[("GET", "/v1/users/{id}"), ("DELETE", "/v1/users/{id}")]);
        assert!(matches!(
            t.lookup(&Method::GET, "/v2/users/1"),
            Lookup::NotFound
        ));
        assert!(matches!(
            t.lookup(&Method::GET, "/v1/users/"),
            Lookup::NotFound
        ));
        assert!(matches!(
            t.lookup(&Method::GET, "no-slash"),
            Lookup::NotFound
        ));
        match t.lookup(&Method::PUT, "/v1/users/1") {
            Lookup::MethodNotAllowed(m) => assert_eq!(m, [Method::GET, Method::DELETE]),
            other => panic!("{other:?}"),
        }
        match t.lookup(&Method::GET, "/v1/users/%FF") {
            Lookup::BadPath(why) => assert!(why.contains("\"%FF\""), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_same_route_twice_is_refused() {
        let mut t = table(&[("GET", "/v1/users/{id}")]);
        let err = t
            .insert(
                Method::GET,
                PathTemplate::parse("/v1/users/{id}").unwrap(),
                9,
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "GET /v1/users/{id} is already routed");
        t.insert(
            Method::GET,
            PathTemplate::parse("/v1/users/{name}").unwrap(),
            9,
        )
        .expect_err("the same shape under another variable name is the same route");
    }
}
