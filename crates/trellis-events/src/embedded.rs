//! The embedded engine: the stream is a table in a SQLite file (WAL), so
//! every service of one `trellis up`, and processes on one machine, share
//! it. A durable consumer is a cursor plus a table of its unacknowledged
//! deliveries with their due times; fetching claims events in one
//! transaction, so subscribers sharing a consumer never get the same
//! delivery. Subscribers in this process are woken by each publish; other
//! processes' events are found by polling (`events.poll`).

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use sqlx::{Row, SqlitePool, sqlite::SqliteRow};
use tokio::sync::watch;

use crate::{
    AckKind, Acker as Settle, ConsumerSettings, Event, EventsError, EventsSettings, Published, Raw,
    StartAt, Stored, event::now_ms, matches,
};

const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "event log",
    "CREATE TABLE trellis_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        msg_id TEXT NOT NULL UNIQUE,
        subject TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX trellis_events_subject ON trellis_events (subject, seq);
    CREATE INDEX trellis_events_time ON trellis_events (time_ms);
    CREATE TABLE trellis_event_consumers (
        name TEXT PRIMARY KEY,
        filter TEXT NOT NULL,
        cursor INTEGER NOT NULL
    );
    CREATE TABLE trellis_event_pending (
        consumer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        deliveries INTEGER NOT NULL,
        due_ms INTEGER NOT NULL,
        PRIMARY KEY (consumer, seq)
    );",
)];

/// Rows read per query while scanning for a consumer's next events.
const PAGE: i64 = 256;
/// Pages scanned in one fetch before it returns (keeps transactions short).
const PAGES_PER_FETCH: usize = 16;
/// Publishes between two retention trims.
const TRIM_EVERY: u64 = 1024;

fn unavailable(e: sqlx::Error) -> EventsError {
    EventsError::Unavailable(format!("embedded event log: {e}"))
}

/// One wake-up channel per database file, shared by every handle on it in
/// this process.
fn changes_for(path: &str) -> watch::Sender<u64> {
    static CHANGES: OnceLock<Mutex<HashMap<String, watch::Sender<u64>>>> = OnceLock::new();
    let map = CHANGES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(path.to_owned())
        .or_insert_with(|| watch::channel(0).0)
        .clone()
}

#[derive(Clone)]
pub(crate) struct Log {
    inner: Arc<LogInner>,
}

struct LogInner {
    pool: SqlitePool,
    changes: watch::Sender<u64>,
    poll: Duration,
    subjects: Vec<String>,
    max_age: Duration,
    published: AtomicU64,
}

impl Log {
    pub(crate) async fn open(path: &Path, settings: &EventsSettings) -> Result<Log, EventsError> {
        let migrator = trellis_store::migrator("_trellis_events_migrations", MIGRATIONS);
        let url = format!("sqlite://{}", path.display());
        let pool = trellis_store::Pool::open(&url, 8, settings.timeout, &migrator)
            .await
            .map_err(|e| EventsError::Unavailable(e.to_string()))?;
        #[allow(irrefutable_let_patterns)]
        let trellis_store::Pool::Sqlite(pool) = pool else {
            return Err(EventsError::Invalid(format!("{url} is not a SQLite file")));
        };
        let key = std::fs::canonicalize(path)
            .map(|p| p.display().to_string())
            .unwrap_or(url);
        Ok(Log {
            inner: Arc::new(LogInner {
                pool,
                changes: changes_for(&key),
                poll: settings.poll,
                subjects: settings.subjects.clone(),
                max_age: settings.max_age,
                published: AtomicU64::new(0),
            }),
        })
    }

    fn wake(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn held(&self, subject: &str) -> Result<(), EventsError> {
        crate::held(&self.inner.subjects, subject)
    }

    async fn append(
        tx: &mut sqlx::SqliteConnection,
        subject: &str,
        msg_id: &str,
        event: &Event,
        expected: Option<u64>,
    ) -> Result<Published, EventsError> {
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM trellis_events WHERE msg_id = $1")
                .bind(msg_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        if let Some(seq) = existing {
            return Ok(Published {
                seq: seq as u64,
                duplicate: true,
            });
        }
        if let Some(expected) = expected {
            let last: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(seq), 0) FROM trellis_events WHERE subject = $1",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
            if last as u64 != expected {
                return Err(EventsError::Conflict {
                    subject: subject.to_owned(),
                    expected,
                });
            }
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO trellis_events (msg_id, subject, time_ms, attributes, data) \
             VALUES ($1, $2, $3, $4, $5) RETURNING seq",
        )
        .bind(msg_id)
        .bind(subject)
        .bind(now_ms())
        .bind(event.attributes_json())
        .bind(event.data.as_ref())
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        Ok(Published {
            seq: seq as u64,
            duplicate: false,
        })
    }

    pub(crate) async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        event: &Event,
        expected: Option<u64>,
    ) -> Result<Published, EventsError> {
        self.held(subject)?;
        let mut tx = self
            .inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)?;
        let published = Self::append(&mut tx, subject, msg_id, event, expected).await?;
        tx.commit().await.map_err(unavailable)?;
        self.published(1).await;
        Ok(published)
    }

    pub(crate) async fn publish_batch(
        &self,
        events: &[(String, Event)],
    ) -> (Vec<Published>, Option<EventsError>) {
        let mut done = Vec::with_capacity(events.len());
        let mut failure = None;
        let mut tx = match self.inner.pool.begin_with("BEGIN IMMEDIATE").await {
            Ok(tx) => tx,
            Err(e) => return (done, Some(unavailable(e))),
        };
        for (subject, event) in events {
            let appended = match self.held(subject) {
                Ok(()) => Self::append(&mut tx, subject, &event.id, event, None).await,
                Err(e) => Err(e),
            };
            match appended {
                Ok(p) => done.push(p),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = tx.commit().await {
            return (Vec::new(), Some(unavailable(e)));
        }
        self.published(done.len() as u64).await;
        (done, failure)
    }

    /// Wakes subscribers, and now and then drops events older than `max_age`.
    async fn published(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.wake();
        let before = self.inner.published.fetch_add(n, Ordering::Relaxed);
        if self.inner.max_age.is_zero() || before / TRIM_EVERY == (before + n) / TRIM_EVERY {
            return;
        }
        let cutoff = now_ms()
            .saturating_sub(i64::try_from(self.inner.max_age.as_millis()).unwrap_or(i64::MAX));
        let trimmed = sqlx::query("DELETE FROM trellis_events WHERE time_ms < $1")
            .bind(cutoff)
            .execute(&self.inner.pool)
            .await;
        if let Ok(r) = trimmed
            && r.rows_affected() > 0
        {
            let _ = sqlx::query(
                "DELETE FROM trellis_event_pending WHERE NOT EXISTS \
                 (SELECT 1 FROM trellis_events e WHERE e.seq = trellis_event_pending.seq)",
            )
            .execute(&self.inner.pool)
            .await;
        }
    }

    pub(crate) async fn last_seq(&self) -> Result<u64, EventsError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'trellis_events'")
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(unavailable)?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// The cursor (last sequence already passed) for `start`.
    async fn cursor_for(&self, start: StartAt) -> Result<i64, EventsError> {
        Ok(match start {
            StartAt::All => 0,
            StartAt::New => self.last_seq().await? as i64,
            StartAt::Seq(n) => i64::try_from(n).unwrap_or(i64::MAX).saturating_sub(1),
            StartAt::TimeMs(t) => {
                let first: Option<i64> =
                    sqlx::query_scalar("SELECT MIN(seq) FROM trellis_events WHERE time_ms >= $1")
                        .bind(t)
                        .fetch_one(&self.inner.pool)
                        .await
                        .map_err(unavailable)?;
                match first {
                    Some(seq) => seq - 1,
                    None => self.last_seq().await? as i64,
                }
            }
        })
    }

    pub(crate) async fn subscribe(&self, settings: &ConsumerSettings) -> Result<Sub, EventsError> {
        let cursor = self.cursor_for(settings.start).await?;
        sqlx::query(
            "INSERT INTO trellis_event_consumers (name, filter, cursor) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET filter = excluded.filter",
        )
        .bind(&settings.durable)
        .bind(&settings.filter)
        .bind(cursor)
        .execute(&self.inner.pool)
        .await
        .map_err(unavailable)?;
        Ok(Sub {
            log: self.clone(),
            settings: settings.clone(),
            buffer: VecDeque::new(),
            changes: self.inner.changes.subscribe(),
        })
    }

    pub(crate) fn read(&self, filter: &str, start: StartAt) -> Reader {
        Reader {
            log: self.clone(),
            filter: filter.to_owned(),
            start: Some(start),
            cursor: 0,
            buffer: VecDeque::new(),
            changes: self.inner.changes.subscribe(),
        }
    }

    async fn settle(
        &self,
        consumer: &str,
        seq: u64,
        kind: AckKind,
        ack_wait: Duration,
    ) -> Result<(), EventsError> {
        let seq = seq as i64;
        let query = match kind {
            AckKind::Ack | AckKind::Term => {
                sqlx::query("DELETE FROM trellis_event_pending WHERE consumer = $1 AND seq = $2")
                    .bind(consumer)
                    .bind(seq)
            }
            AckKind::Nak(_) | AckKind::Progress => {
                let delay = match kind {
                    AckKind::Nak(delay) => delay,
                    _ => ack_wait,
                };
                sqlx::query(
                    "UPDATE trellis_event_pending SET due_ms = $1 WHERE consumer = $2 AND seq = $3",
                )
                .bind(now_ms().saturating_add(millis(delay)))
                .bind(consumer)
                .bind(seq)
            }
        };
        query.execute(&self.inner.pool).await.map_err(unavailable)?;
        if matches!(kind, AckKind::Nak(d) if d.is_zero()) {
            self.wake();
        }
        Ok(())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn stored(row: &SqliteRow) -> Result<(Result<Stored, crate::EventError>, i64), sqlx::Error> {
    let seq: i64 = row.try_get("seq")?;
    let attributes: String = row.try_get("attributes")?;
    let data: Vec<u8> = row.try_get("data")?;
    let subject: String = row.try_get("subject")?;
    let published_ms: i64 = row.try_get("time_ms")?;
    let stored = Event::from_attributes_json(&attributes, Bytes::from(data)).map(|event| Stored {
        seq: seq as u64,
        subject,
        published_ms,
        event,
    });
    Ok((stored, seq))
}

/// A subscriber of one durable consumer on the embedded log.
pub(crate) struct Sub {
    log: Log,
    settings: ConsumerSettings,
    buffer: VecDeque<Raw>,
    changes: watch::Receiver<u64>,
}

impl Sub {
    pub(crate) async fn next(&mut self) -> Result<Raw, EventsError> {
        loop {
            if let Some(raw) = self.buffer.pop_front() {
                return Ok(raw);
            }
            self.changes.borrow_and_update();
            let more = self.fetch().await?;
            if !self.buffer.is_empty() || more {
                continue;
            }
            tokio::select! {
                _ = self.changes.changed() => {}
                _ = tokio::time::sleep(self.log.inner.poll) => {}
            }
        }
    }

    fn raw(&self, row: &SqliteRow, delivered: u32) -> Result<Raw, sqlx::Error> {
        let seq: i64 = row.try_get("seq")?;
        let attributes: String = row.try_get("attributes")?;
        let data: Vec<u8> = row.try_get("data")?;
        Ok(Raw {
            seq: seq as u64,
            subject: row.try_get("subject")?,
            published_ms: row.try_get("time_ms")?,
            delivered,
            event: Event::from_attributes_json(&attributes, Bytes::from(data)),
            acker: Settle::Embedded(Acker {
                log: self.log.clone(),
                consumer: self.settings.durable.clone(),
                seq: seq as u64,
                ack_wait: self.settings.ack_wait,
            }),
        })
    }

    /// Claims due redeliveries and new events, up to the batch and the
    /// room `max_ack_pending` leaves. Whether it stopped scanning early.
    async fn fetch(&mut self) -> Result<bool, EventsError> {
        let s = &self.settings;
        let name = s.durable.as_str();
        let now = now_ms();
        let due_at = now.saturating_add(millis(s.ack_wait));
        let batch = i64::from(s.batch);
        let mut tx = self
            .log
            .inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)?;
        let due = sqlx::query(
            "SELECT p.seq AS seq, p.deliveries AS deliveries, e.subject AS subject, \
             e.time_ms AS time_ms, e.attributes AS attributes, e.data AS data \
             FROM trellis_event_pending p JOIN trellis_events e ON e.seq = p.seq \
             WHERE p.consumer = $1 AND p.due_ms <= $2 ORDER BY p.seq LIMIT $3",
        )
        .bind(name)
        .bind(now)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let mut out = Vec::new();
        for row in &due {
            let seq: i64 = row.try_get("seq").map_err(unavailable)?;
            let deliveries: i64 = row.try_get("deliveries").map_err(unavailable)?;
            sqlx::query(
                "UPDATE trellis_event_pending SET deliveries = deliveries + 1, due_ms = $1 \
                 WHERE consumer = $2 AND seq = $3",
            )
            .bind(due_at)
            .bind(name)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            let delivered = u32::try_from(deliveries + 1).unwrap_or(u32::MAX);
            out.push(self.raw(row, delivered).map_err(unavailable)?);
        }
        let pending: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM trellis_event_pending WHERE consumer = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        let room = (i64::from(s.max_ack_pending) - pending).min(batch - out.len() as i64);
        let mut more = false;
        if room > 0 {
            let (filter, mut cursor): (String, i64) = sqlx::query_as(
                "SELECT filter, cursor FROM trellis_event_consumers WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| EventsError::Closed(name.to_owned()))?;
            let mut taken = 0;
            'scan: for page in 0..PAGES_PER_FETCH {
                let rows = sqlx::query(
                    "SELECT seq, subject, time_ms, attributes, data FROM trellis_events \
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(cursor)
                .bind(PAGE)
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
                for row in &rows {
                    let seq: i64 = row.try_get("seq").map_err(unavailable)?;
                    let subject: String = row.try_get("subject").map_err(unavailable)?;
                    if matches(&filter, &subject) {
                        if taken == room {
                            break 'scan;
                        }
                        sqlx::query(
                            "INSERT INTO trellis_event_pending (consumer, seq, deliveries, due_ms) \
                             VALUES ($1, $2, 1, $3)",
                        )
                        .bind(name)
                        .bind(seq)
                        .bind(due_at)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                        out.push(self.raw(row, 1).map_err(unavailable)?);
                        taken += 1;
                    }
                    cursor = seq;
                }
                if (rows.len() as i64) < PAGE {
                    break;
                }
                more = page + 1 == PAGES_PER_FETCH;
            }
            sqlx::query("UPDATE trellis_event_consumers SET cursor = $1 WHERE name = $2")
                .bind(cursor)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        self.buffer.extend(out);
        Ok(more)
    }
}

/// Settles one embedded delivery.
pub(crate) struct Acker {
    log: Log,
    consumer: String,
    seq: u64,
    ack_wait: Duration,
}

impl Acker {
    pub(crate) async fn ack(&self, kind: AckKind) -> Result<(), EventsError> {
        self.log
            .settle(&self.consumer, self.seq, kind, self.ack_wait)
            .await
    }
}

/// An ordered read of the embedded log.
pub(crate) struct Reader {
    log: Log,
    filter: String,
    start: Option<StartAt>,
    cursor: i64,
    buffer: VecDeque<Stored>,
    changes: watch::Receiver<u64>,
}

impl Reader {
    pub(crate) async fn next(&mut self) -> Result<Stored, EventsError> {
        loop {
            if let Some(stored) = self.next_until(i64::MAX as u64).await? {
                return Ok(stored);
            }
            tokio::select! {
                _ = self.changes.changed() => {}
                _ = tokio::time::sleep(self.log.inner.poll) => {}
            }
        }
    }

    /// The next event at or before `last`; none when the log has no more.
    pub(crate) async fn next_until(&mut self, last: u64) -> Result<Option<Stored>, EventsError> {
        if let Some(start) = self.start.take() {
            self.cursor = self.log.cursor_for(start).await?;
        }
        let last = i64::try_from(last).unwrap_or(i64::MAX);
        loop {
            if let Some(stored) = self.buffer.pop_front() {
                return Ok(Some(stored));
            }
            self.changes.borrow_and_update();
            let rows = sqlx::query(
                "SELECT seq, subject, time_ms, attributes, data FROM trellis_events \
                 WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            )
            .bind(self.cursor)
            .bind(last)
            .bind(PAGE)
            .fetch_all(&self.log.inner.pool)
            .await
            .map_err(unavailable)?;
            for row in &rows {
                let (stored, seq) = stored(row).map_err(unavailable)?;
                self.cursor = seq;
                match stored {
                    Ok(stored) if matches(&self.filter, &stored.subject) => {
                        self.buffer.push_back(stored)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(seq, error = %e, "skipping an unreadable event"),
                }
            }
            if !self.buffer.is_empty() || rows.len() as i64 == PAGE {
                continue;
            }
            return Ok(None);
        }
    }
}
