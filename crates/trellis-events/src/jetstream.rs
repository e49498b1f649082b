//! The JetStream engine: one stream (file storage) created or updated from
//! settings, events in binary mode (`ce-*` headers) with `Nats-Msg-Id`
//! set to the event id, durable pull consumers with explicit
//! acknowledgement, and acknowledgements the server confirms (double ack).
//! The client reconnects by itself; a subscription whose pull loop ends is
//! started again where the consumer's state says.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind as JsAck, Message,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::PublishErrorKind,
    message::{Acker, PublishMessage},
    stream,
};
use futures_util::StreamExt;

use crate::{
    AckKind, Acker as Settle, ConsumerSettings, Event, EventsError, EventsSettings, Published, Raw,
    STRUCTURED_CONTENT_TYPE, StartAt, Stored,
};

fn unavailable(what: &str, e: impl std::fmt::Display) -> EventsError {
    EventsError::Unavailable(format!("JetStream {what}: {e}"))
}

pub(crate) struct Js {
    context: jetstream::Context,
    stream: stream::Stream,
    subjects: Vec<String>,
}

impl Js {
    pub(crate) async fn connect(url: &str, settings: &EventsSettings) -> Result<Js, EventsError> {
        let shown = trellis_core::redact_url(url);
        let mut options = async_nats::ConnectOptions::new()
            .name("trellis")
            .connection_timeout(settings.timeout)
            .request_timeout(Some(settings.timeout));
        if url.starts_with("tls://") {
            options = options.require_tls(true);
        }
        if let Some(ca) = &settings.ca_file {
            options = options.add_root_certificates(ca.into());
        }
        let client = options
            .connect(url)
            .await
            .map_err(|e| unavailable(&format!("connect to {shown}"), e))?;
        let context = jetstream::ContextBuilder::new()
            .timeout(settings.timeout)
            .build(client);
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: settings.subjects.clone(),
            max_age: settings.max_age,
            duplicate_window: settings.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        context
            .create_or_update_stream(config)
            .await
            .map_err(|e| unavailable(&format!("stream {}", settings.stream), e))?;
        let stream = context
            .get_stream(&settings.stream)
            .await
            .map_err(|e| unavailable(&format!("stream {}", settings.stream), e))?;
        Ok(Js {
            context,
            stream,
            subjects: settings.subjects.clone(),
        })
    }

    fn held(&self, subject: &str) -> Result<(), EventsError> {
        crate::held(&self.subjects, subject)
    }

    fn message(msg_id: &str, event: &Event, expected: Option<u64>) -> PublishMessage {
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in event.to_headers() {
            headers.insert(name.as_str(), value.as_str());
        }
        // Headers first: `message_id` adds to them.
        let publish = PublishMessage::build()
            .headers(headers)
            .message_id(msg_id)
            .payload(event.data.clone());
        match expected {
            Some(seq) => publish.expected_last_subject_sequence(seq),
            None => publish,
        }
    }

    fn publish_error(
        &self,
        subject: &str,
        expected: Option<u64>,
        e: async_nats::jetstream::context::PublishError,
    ) -> EventsError {
        match e.kind() {
            PublishErrorKind::WrongLastSequence => EventsError::Conflict {
                subject: subject.to_owned(),
                expected: expected.unwrap_or(0),
            },
            PublishErrorKind::StreamNotFound => EventsError::NoStream {
                subject: subject.to_owned(),
                subjects: self.subjects.join(", "),
            },
            PublishErrorKind::MaxPayloadExceeded => EventsError::Invalid(e.to_string()),
            _ => unavailable("publish", e),
        }
    }

    pub(crate) async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        event: &Event,
        expected: Option<u64>,
    ) -> Result<Published, EventsError> {
        self.held(subject)?;
        let ack = self
            .context
            .send_publish(subject.to_owned(), Self::message(msg_id, event, expected))
            .await
            .map_err(|e| self.publish_error(subject, expected, e))?
            .await
            .map_err(|e| self.publish_error(subject, expected, e))?;
        Ok(Published {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    pub(crate) async fn publish_batch(
        &self,
        events: &[(String, Event)],
    ) -> (Vec<Published>, Option<EventsError>) {
        let mut pending = Vec::with_capacity(events.len());
        let mut failure = None;
        for (subject, event) in events {
            if let Err(e) = self.held(subject) {
                failure = Some(e);
                break;
            }
            match self
                .context
                .send_publish(subject.clone(), Self::message(&event.id, event, None))
                .await
            {
                Ok(ack) => pending.push((subject, ack)),
                Err(e) => {
                    failure = Some(self.publish_error(subject, None, e));
                    break;
                }
            }
        }
        let mut done = Vec::with_capacity(pending.len());
        for (subject, ack) in pending {
            match ack.await {
                Ok(ack) => done.push(Published {
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                }),
                Err(e) => {
                    failure = Some(self.publish_error(subject, None, e));
                    break;
                }
            }
        }
        (done, failure)
    }

    pub(crate) async fn last_seq(&self) -> Result<u64, EventsError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| unavailable("stream info", e))?;
        Ok(info.state.last_sequence)
    }

    pub(crate) async fn subscribe(&self, settings: &ConsumerSettings) -> Result<Sub, EventsError> {
        let config = pull::Config {
            durable_name: Some(settings.durable.clone()),
            filter_subject: settings.filter.clone(),
            deliver_policy: deliver_policy(settings.start)?,
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            // One delivery past the limit reaches the subscription, which
            // moves it to the dead-letter subject (a handler that timed out
            // on its last attempt never said so).
            max_deliver: i64::from(settings.max_deliver) + 1,
            max_ack_pending: i64::from(settings.max_ack_pending),
            ..Default::default()
        };
        let consumer: PullConsumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| unavailable(&format!("consumer {}", settings.durable), e))?;
        let mut sub = Sub {
            consumer,
            batch: settings.batch as usize,
            messages: None,
        };
        sub.messages = Some(sub.pull().await?);
        Ok(sub)
    }

    pub(crate) async fn read(&self, filter: &str, start: StartAt) -> Result<Reader, EventsError> {
        let consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: deliver_policy(start)?,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("ordered consumer", e))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("ordered consumer", e))?;
        Ok(Reader {
            messages,
            caught_up: pending == 0,
        })
    }
}

fn deliver_policy(start: StartAt) -> Result<DeliverPolicy, EventsError> {
    Ok(match start {
        StartAt::All => DeliverPolicy::All,
        StartAt::New => DeliverPolicy::New,
        StartAt::Seq(n) => DeliverPolicy::ByStartSequence {
            start_sequence: n.max(1),
        },
        StartAt::TimeMs(ms) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map_err(|e| EventsError::Invalid(format!("start time {ms}: {e}")))?,
        },
    })
}

/// The event a JetStream message carries: binary mode, or structured mode
/// when its content type says so.
fn event_of(message: &async_nats::Message) -> Result<Event, crate::EventError> {
    let headers = message.headers.as_ref();
    let structured = headers
        .and_then(|h| h.get("content-type").or_else(|| h.get("Content-Type")))
        .is_some_and(|v| v.as_str().starts_with(STRUCTURED_CONTENT_TYPE));
    let has_ce = headers.is_some_and(|h| {
        h.iter().any(|(name, _)| {
            let name: &str = name.as_ref();
            name.eq_ignore_ascii_case("ce-specversion")
        })
    });
    if structured && !has_ce {
        return Event::from_structured(&message.payload);
    }
    let pairs = headers.into_iter().flat_map(|h| {
        h.iter()
            .filter_map(|(name, values)| values.first().map(|v| (name.as_ref(), v.as_str())))
    });
    Event::from_headers(pairs, message.payload.clone())
}

fn published_ms(info: &jetstream::message::Info<'_>) -> i64 {
    i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// A subscriber of one durable pull consumer.
pub(crate) struct Sub {
    consumer: PullConsumer,
    batch: usize,
    messages: Option<pull::Stream>,
}

impl Sub {
    async fn pull(&self) -> Result<pull::Stream, EventsError> {
        self.consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| unavailable("pull", e))
    }

    pub(crate) async fn next(&mut self) -> Result<Raw, EventsError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let next = match self.messages.as_mut() {
                // Cancel-safe: a message not yet taken stays in the stream.
                Some(messages) => match tokio::time::timeout(IDLE, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if self.stalled().await {
                            self.messages = None;
                        }
                        continue;
                    }
                },
                None => None,
            };
            match next {
                Some(Ok(message)) => return raw(message),
                Some(Err(e)) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                    tracing::debug!(error = %e, "JetStream pull");
                    if matches!(e.kind(), K::ConsumerDeleted) {
                        return Err(EventsError::Closed(e.to_string()));
                    }
                    // Missing heartbeats (the server restarted or the
                    // connection broke) or a failed pull: the pull requests
                    // in flight are gone; start pulling afresh.
                    self.messages = None;
                }
                None => self.messages = None,
            }
            // The pull loop ended (the server went away): start it again,
            // backing off while the server is unreachable.
            while self.messages.is_none() {
                match self.pull().await {
                    Ok(messages) => self.messages = Some(messages),
                    Err(e) => {
                        tracing::debug!(error = %e, "JetStream pull restart");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// After [`IDLE`] without a message: whether the pull looks lost — the
    /// server holds no pull request of this consumer (a server restart can
    /// drop them without the client's stream noticing), or it has events
    /// ready that nobody was given. Unreachable counts as lost too: the
    /// pull is restarted with backoff.
    async fn stalled(&mut self) -> bool {
        match self.consumer.info().await {
            Ok(info) => {
                let stalled = info.num_waiting == 0 || info.num_pending > 0;
                if stalled {
                    tracing::debug!(
                        waiting = info.num_waiting,
                        pending = info.num_pending,
                        "JetStream pull idle and stalled: pulling afresh"
                    );
                }
                stalled
            }
            Err(e) => {
                tracing::debug!(error = %e, "JetStream consumer info");
                true
            }
        }
    }
}

/// How long a subscription waits for a message before it checks that its
/// pull is still alive on the server.
const IDLE: Duration = Duration::from_secs(10);

fn raw(message: Message) -> Result<Raw, EventsError> {
    let info = message.info().map_err(|e| unavailable("message info", e))?;
    let (seq, delivered, published) = (
        info.stream_sequence,
        u32::try_from(info.delivered).unwrap_or(u32::MAX),
        published_ms(&info),
    );
    let (message, acker) = message.split();
    Ok(Raw {
        seq,
        subject: message.subject.to_string(),
        published_ms: published,
        delivered,
        event: event_of(&message),
        acker: Settle::JetStream(acker),
    })
}

pub(crate) async fn ack(acker: &Acker, kind: AckKind) -> Result<(), EventsError> {
    let done = match kind {
        AckKind::Ack => acker.double_ack().await,
        AckKind::Nak(delay) => acker.ack_with(JsAck::Nak(Some(delay))).await,
        AckKind::Progress => acker.ack_with(JsAck::Progress).await,
        AckKind::Term => acker.ack_with(JsAck::Term).await,
    };
    done.map_err(|e| unavailable("ack", e))
}

/// An ordered read of the stream (an ordered consumer).
pub(crate) struct Reader {
    messages: pull::Ordered,
    /// No message matching the filter was pending after the last one read.
    caught_up: bool,
}

impl Reader {
    pub(crate) async fn next(&mut self) -> Result<Stored, EventsError> {
        loop {
            if let Some(stored) = self.read(None).await? {
                return Ok(stored);
            }
        }
    }

    /// The next event at or before `last`; none once the stream has no
    /// more (as the server counted when the last one was delivered).
    pub(crate) async fn next_until(&mut self, last: u64) -> Result<Option<Stored>, EventsError> {
        if self.caught_up {
            return Ok(None);
        }
        match self.read(Some(last)).await? {
            Some(stored) if stored.seq <= last => Ok(Some(stored)),
            _ => {
                self.caught_up = true;
                Ok(None)
            }
        }
    }

    async fn read(&mut self, last: Option<u64>) -> Result<Option<Stored>, EventsError> {
        loop {
            match self.messages.next().await {
                Some(Ok(message)) => {
                    let info = message.info().map_err(|e| unavailable("message info", e))?;
                    let (seq, published) = (info.stream_sequence, published_ms(&info));
                    if last.is_some() {
                        self.caught_up = info.pending == 0;
                    }
                    match event_of(&message) {
                        Ok(event) => {
                            return Ok(Some(Stored {
                                seq,
                                subject: message.subject.to_string(),
                                published_ms: published,
                                event,
                            }));
                        }
                        Err(e) => {
                            tracing::warn!(seq, error = %e, "skipping a message that is not a CloudEvent");
                            if last.is_some_and(|last| seq >= last)
                                || (last.is_some() && self.caught_up)
                            {
                                return Ok(None);
                            }
                        }
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "JetStream ordered read"),
                None => return Err(EventsError::Closed("ordered read".to_owned())),
            }
        }
    }
}
