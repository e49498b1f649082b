//! The audit trail: who did what, when, with what outcome — appended to a
//! file of JSON lines in which every record carries the hash of the one
//! before it, so a changed, inserted or deleted record breaks the chain
//! and [`verify`] names where.
//!
//! ```no_run
//! # async fn run() -> Result<(), trellis_auth::audit::AuditError> {
//! use trellis_auth::audit::{AuditLog, Entry};
//!
//! let log = AuditLog::open("audit.jsonl".as_ref())?;
//! log.append(Entry::new("token_refused", "GET /v1/orders", "refused: expired")).await?;
//! let report = trellis_auth::audit::verify("audit.jsonl".as_ref())?;
//! assert!(report.broken.is_none());
//! # Ok(()) }
//! ```
//!
//! What the chain proves and what it does not: any change inside the file
//! — a record altered, removed, inserted or reordered — is found. Records
//! cut from the *end* leave a shorter valid chain; keep the head hash
//! [`verify`] reports somewhere else (a log shipper, a ticket) to detect
//! that too. Records are also emitted as log lines (`trellis::audit`), so
//! an OTLP log pipeline keeps a second copy.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The longest record line read back (a longer one is damage).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Why the audit trail could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file's last record does not parse (the trail is damaged; run
    /// `trellis audit verify`).
    #[error("{path}: the last record is damaged: {reason}")]
    Damaged {
        /// Which file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// What happened, as a caller records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What kind of event: `login`, `token_refused`, `call`, ...
    pub kind: String,
    /// Who: the token's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The subject's tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// The calling peer's identity (an mTLS certificate's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// What: the method or route.
    pub action: String,
    /// On what: a resource id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// How it ended: `allowed`, `refused: expired`, `ok`, `failed`, ...
    pub outcome: String,
    /// The request's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Entry {
    /// An entry of `kind` for `action` with `outcome`; the rest unset.
    pub fn new(
        kind: impl Into<String>,
        action: impl Into<String>,
        outcome: impl Into<String>,
    ) -> Entry {
        Entry {
            kind: kind.into(),
            action: action.into(),
            outcome: outcome.into(),
            ..Entry::default()
        }
    }
}

/// One record of the trail: the entry, where it sits, when, and the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// 1 for the first record, then one more each.
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub entry: Entry,
    /// The previous record's hash ([`GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 (hex) of `prev`, a newline, and this record as JSON with an
    /// empty `hash`.
    pub hash: String,
}

impl Record {
    fn digest(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        let body = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(self.prev.as_bytes());
        ctx.update(b"\n");
        ctx.update(&body);
        hex(ctx.finish().as_ref())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// An append-only audit trail in one file (see the module docs). Cheap to
/// clone; appends are serialised.
#[derive(Clone)]
pub struct AuditLog {
    path: Arc<PathBuf>,
    state: Arc<Mutex<Tail>>,
}

struct Tail {
    file: File,
    seq: u64,
    hash: String,
}

impl AuditLog {
    /// Opens (or creates) the trail at `path`, continuing its chain.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let (seq, hash) = match last_line(&mut file).map_err(io)? {
            None => (0, GENESIS.to_owned()),
            Some(line) => {
                let record: Record =
                    serde_json::from_str(&line).map_err(|e| AuditError::Damaged {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                (record.seq, record.hash)
            }
        };
        Ok(AuditLog {
            path: Arc::new(path.to_owned()),
            state: Arc::new(Mutex::new(Tail { file, seq, hash })),
        })
    }

    /// Appends `entry` (written and flushed to the file before this
    /// returns) and emits it as a `trellis::audit` log line.
    pub async fn append(&self, entry: Entry) -> Result<Record, AuditError> {
        let mut tail = self.state.lock().await;
        let mut record = Record {
            seq: tail.seq + 1,
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            entry,
            prev: tail.hash.clone(),
            hash: String::new(),
        };
        record.hash = record.digest();
        let mut line = serde_json::to_vec(&record).unwrap_or_default();
        line.push(b'\n');
        // One small append to a file the page cache holds (written in
        // place: microseconds); the lock keeps the chain in order.
        tail.file
            .write_all(&line)
            .and_then(|()| tail.file.flush())
            .map_err(|source| AuditError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        tail.seq = record.seq;
        tail.hash = record.hash.clone();
        tracing::info!(
            target: "trellis::audit",
            seq = record.seq,
            kind = record.entry.kind.as_str(),
            subject = record.entry.subject.as_deref(),
            tenant = record.entry.tenant.as_deref(),
            client_ip = record.entry.client_ip.as_deref(),
            peer = record.entry.peer.as_deref(),
            action = record.entry.action.as_str(),
            resource = record.entry.resource.as_deref(),
            outcome = record.entry.outcome.as_str(),
            "audit"
        );
        Ok(record)
    }

    /// Where the trail is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The last non-empty line of `file`, read from the end.
fn last_line(file: &mut File) -> std::io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX_LINE_BYTES as u64 + 1);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(len - start).read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    Ok(text
        .trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .filter(|l| !l.is_empty())
        .map(str::to_owned))
}

/// At most 512 bytes of `text` (on a character boundary): what a record
/// keeps of a path or a name a client chose.
pub fn bounded(text: &str) -> String {
    let mut end = text.len().min(512);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The current trace's id, when there is one: what a record links to.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Where a component's trail goes, and its cap on refusal records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// The trail's file (created if missing, continued if present).
    pub file: PathBuf,
    /// Refusals recorded per second at most (a flood of bad tokens must not
    /// fill the disk); the excess is counted in
    /// `audit_records_dropped_total{kind="refusal"}`. Default 100.
    #[serde(default = "hundred")]
    pub max_refusals_per_second: u32,
}

fn hundred() -> u32 {
    100
}

/// An [`AuditLog`] for a component's decisions: refusals capped per
/// second, and a trail that cannot be written logged — never the
/// request's failure.
pub struct Recorder {
    settings: AuditSettings,
    log: AuditLog,
    /// (second, refusals recorded in it).
    window: std::sync::Mutex<(u64, u32)>,
}

impl Recorder {
    /// Opens the trail `settings` names.
    pub fn open(settings: &AuditSettings) -> Result<Recorder, AuditError> {
        Ok(Recorder {
            settings: settings.clone(),
            log: AuditLog::open(&settings.file)?,
            window: std::sync::Mutex::new((0, 0)),
        })
    }

    /// What it was opened with.
    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// Records `entry`; a `refusal` past the per-second cap is counted
    /// instead.
    pub async fn record(&self, entry: Entry, refusal: bool) {
        if refusal {
            let second = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut window = self
                .window
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if window.0 != second {
                *window = (second, 0);
            }
            if window.1 >= self.settings.max_refusals_per_second {
                metrics::counter!("audit_records_dropped_total", "kind" => "refusal").increment(1);
                return;
            }
            window.1 += 1;
        }
        if let Err(e) = self.log.append(entry).await {
            metrics::counter!("audit_records_dropped_total", "kind" => "error").increment(1);
            tracing::error!(error = %e, "the audit trail cannot be written");
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records read (up to the first break).
    pub records: u64,
    /// The last good record's hash: keep it elsewhere to detect a trail
    /// cut short later.
    pub head: String,
    /// Where the chain breaks: the line number (from 1) and why.
    pub broken: Option<(u64, String)>,
}

/// Reads the whole trail and checks the chain: sequence numbers one apart,
/// each record's `prev` the previous `hash`, each `hash` recomputed.
pub fn verify(path: &Path) -> Result<Verified, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut report = Verified {
        records: 0,
        head: GENESIS.to_owned(),
        broken: None,
    };
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_line(&mut line)
            .map_err(|source| AuditError::Io {
                path: path.display().to_string(),
                source,
            })?;
        if read == 0 {
            return Ok(report);
        }
        number += 1;
        let broken = |why: String| Some((number, why));
        if line.len() > MAX_LINE_BYTES {
            report.broken = broken(format!("a line over {MAX_LINE_BYTES} bytes"));
            return Ok(report);
        }
        let record: Record = match serde_json::from_str(line.trim_end()) {
            Ok(r) => r,
            Err(e) => {
                report.broken = broken(format!("not a record: {e}"));
                return Ok(report);
            }
        };
        if record.seq != report.records + 1 {
            report.broken = broken(format!(
                "sequence {} where {} was due (a record removed or inserted)",
                record.seq,
                report.records + 1
            ));
            return Ok(report);
        }
        if record.prev != report.head {
            report.broken = broken("does not follow the record before it".to_owned());
            return Ok(report);
        }
        if record.digest() != record.hash {
            report.broken = broken("its hash does not match its contents (changed)".to_owned());
            return Ok(report);
        }
        report.records = record.seq;
        report.head = record.hash;
    }
}

/// Every record of the trail, in order (for `trellis audit tail`).
pub fn read_all(path: &Path) -> Result<Vec<Record>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io)?;
        if let Ok(record) = serde_json::from_str::<Record>(&line) {
            out.push(record);
        }
    }
    Ok(out)
}
