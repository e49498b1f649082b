//! Ordered delivery per key ([`Subscription::keyed`]): events with the same
//! key (their CloudEvents `subject`, the aggregate they are about) are
//! handed out one at a time and in stream order — across redeliveries —
//! while events of other keys go on in parallel.
//!
//! A consumer's deliveries arrive in stream order, but an event that is
//! negatively acknowledged, retried or not acknowledged in time comes back
//! *after* later ones; a consumer handling several at once may also finish
//! them out of order. Here each key has a head: the oldest of its events
//! not yet finished (acknowledged, terminated or dead-lettered). Only the
//! head is handed out; later events of the key are held until it finishes.
//! A head that was negatively acknowledged (or dropped) is waited for until
//! it is delivered again. Held events are kept alive with "in progress"
//! every third of `ack_wait`, so they are not redelivered — nor counted
//! toward `max_deliver` — for waiting their turn.
//!
//! What it costs: held events count toward `max_ack_pending`; a key whose
//! head keeps failing holds its later events (and so that much of the
//! window) until the head is dead-lettered after `max_deliver` attempts.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tokio::sync::mpsc;

use crate::{Delivery, EventsError, Subscription};

/// How a handed-out delivery was settled, sent back by [`Delivery`].
pub(crate) struct Settle {
    key: String,
    to: mpsc::UnboundedSender<(String, u64, bool)>,
}

impl Settle {
    /// `finished`: acknowledged, terminated or dead-lettered; otherwise it
    /// will be delivered again.
    pub(crate) fn send(self, seq: u64, finished: bool) {
        // The subscription may be gone: nothing waits for the key then.
        let _ = self.to.send((self.key, seq, finished));
    }
}

#[derive(Default)]
struct Key {
    /// The stream sequence of the key's oldest unfinished event.
    head: u64,
    /// Whether the head is with a handler now.
    out: bool,
    /// Later events of the key (and fresh copies of the head), by sequence.
    held: BTreeMap<u64, Delivery>,
}

/// A subscription that keeps each key's events in order
/// ([`Subscription::keyed`]).
pub struct KeyedSubscription {
    durable: String,
    incoming: mpsc::Receiver<Result<Delivery, EventsError>>,
    settled_tx: mpsc::UnboundedSender<(String, u64, bool)>,
    settled: mpsc::UnboundedReceiver<(String, u64, bool)>,
    keys: HashMap<String, Key>,
    ready: VecDeque<Delivery>,
    keep_alive: tokio::time::Interval,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for KeyedSubscription {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Subscription {
    /// This subscription with ordered delivery per key (the events'
    /// CloudEvents `subject`; events without one are not held): see
    /// [`KeyedSubscription`]. Must be called inside a Tokio runtime (it
    /// reads the consumer from a task of its own).
    pub fn keyed(mut self) -> KeyedSubscription {
        let durable = self.settings.durable.clone();
        let every = (self.settings.ack_wait / 3).max(std::time::Duration::from_millis(5));
        let (settled_tx, settled) = mpsc::unbounded_channel();
        self.dead_lettered = Some(settled_tx.clone());
        // One delivery read ahead: the consumer's own window does the rest.
        let (tx, incoming) = mpsc::channel(1);
        let pump = tokio::spawn(async move {
            loop {
                let next = self.next().await;
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut keep_alive = tokio::time::interval(every);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        KeyedSubscription {
            durable,
            incoming,
            settled_tx,
            settled,
            keys: HashMap::new(),
            ready: VecDeque::new(),
            keep_alive,
            pump,
        }
    }
}

impl KeyedSubscription {
    /// The next delivery whose key is free (its predecessors finished),
    /// waiting for one. Settle it like any [`Delivery`]; its key's next
    /// event is handed out once it is acknowledged, terminated or
    /// dead-lettered.
    pub async fn next(&mut self) -> Result<Delivery, EventsError> {
        loop {
            while let Ok((key, seq, finished)) = self.settled.try_recv() {
                self.on_settled(key, seq, finished);
            }
            if let Some(delivery) = self.ready.pop_front() {
                return Ok(delivery);
            }
            tokio::select! {
                incoming = self.incoming.recv() => match incoming {
                    Some(Ok(delivery)) => self.admit(delivery),
                    Some(Err(e)) => return Err(e),
                    None => return Err(EventsError::Closed(self.durable.clone())),
                },
                Some((key, seq, finished)) = self.settled.recv() => {
                    self.on_settled(key, seq, finished);
                }
                _ = self.keep_alive.tick() => self.keep_held_alive().await,
            }
        }
    }

    /// How many events wait for their key (held back).
    pub fn held(&self) -> usize {
        self.keys.values().map(|k| k.held.len()).sum()
    }

    fn hand_out(&mut self, key: &str, mut delivery: Delivery) {
        delivery.settle = Some(Settle {
            key: key.to_owned(),
            to: self.settled_tx.clone(),
        });
        self.ready.push_back(delivery);
    }

    fn admit(&mut self, delivery: Delivery) {
        let Some(key) = delivery.event.subject.clone() else {
            self.ready.push_back(delivery);
            return;
        };
        let seq = delivery.seq;
        let state = self.keys.entry(key.clone()).or_default();
        if state.head == 0 {
            // A key with nothing pending: this is its head.
            state.head = seq;
            state.out = true;
        } else if seq < state.head {
            // A copy of an event the key already finished (its
            // acknowledgement crossed the redelivery): handed out as is,
            // for the consumer's inbox to recognise.
            self.ready.push_back(delivery);
            return;
        } else if seq == state.head && !state.out {
            // The head, delivered again after a negative acknowledgement.
            state.out = true;
        } else {
            // A later event of a busy key, or a fresh copy of a head that
            // is out: it waits (a newer copy replaces an older one).
            state.held.insert(seq, delivery);
            return;
        }
        self.hand_out(&key, delivery);
    }

    fn on_settled(&mut self, key: String, seq: u64, finished: bool) {
        let Some(state) = self.keys.get_mut(&key) else {
            return;
        };
        if seq != state.head {
            return;
        }
        let next = if finished {
            // Copies of the finished head are stale: let them go.
            state.held.retain(|&s, _| s > seq);
            match state.held.pop_first() {
                Some((next, delivery)) => {
                    state.head = next;
                    state.out = true;
                    Some(delivery)
                }
                None => {
                    self.keys.remove(&key);
                    None
                }
            }
        } else {
            // It comes back; a fresh copy already here goes out now.
            match state.held.remove(&seq) {
                Some(copy) => Some(copy),
                None => {
                    state.out = false;
                    None
                }
            }
        };
        if let Some(delivery) = next {
            self.hand_out(&key, delivery);
        }
    }

    async fn keep_held_alive(&mut self) {
        for state in self.keys.values() {
            for delivery in state.held.values() {
                if let Err(e) = delivery.in_progress().await {
                    tracing::debug!(consumer = self.durable, seq = delivery.seq, error = %e, "keeping a held event alive failed");
                }
            }
        }
    }
}
