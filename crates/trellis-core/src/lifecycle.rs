//! The lifecycle of a service instance: Starting → Ready → Draining → Stopped.
//!
//! The [`Lifecycle`] is owned by the `App` that runs the instance; everything
//! that must follow it (health endpoints, registration, telemetry) holds a
//! [`tokio::sync::watch::Receiver<State>`] and reacts to changes. States only
//! move forward, so a follower never sees Ready after Draining.

use tokio::sync::watch;

/// Where a service instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Listeners may be bound, start hooks are running; not ready for traffic.
    Starting,
    /// Serving traffic: readiness passes and the instance may be registered.
    Ready,
    /// Shutting down: readiness fails, the instance deregisters, in-flight
    /// requests drain. Liveness still passes.
    Draining,
    /// Every server has stopped.
    Stopped,
}

impl State {
    /// Whether a readiness probe passes: only while [`State::Ready`].
    pub fn is_ready(self) -> bool {
        self == State::Ready
    }

    /// Whether a startup probe passes: once the instance has left [`State::Starting`].
    pub fn has_started(self) -> bool {
        self != State::Starting
    }

    /// Whether a liveness probe passes: until the instance has stopped.
    pub fn is_alive(self) -> bool {
        self != State::Stopped
    }

    /// A lower-case name for logs and probe bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The owner's handle on an instance's lifecycle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    tx: watch::Sender<State>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A lifecycle in [`State::Starting`].
    pub fn new() -> Self {
        let (tx, _) = watch::channel(State::Starting);
        Lifecycle { tx }
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.tx.borrow()
    }

    /// A receiver that observes every later transition.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    /// Moves to `next` if it lies ahead of the current state; returns whether it moved.
    ///
    /// Backward moves are ignored rather than an error: a late "ready" from a
    /// slow start hook must not resurrect an instance that is already draining.
    pub fn advance(&self, next: State) -> bool {
        self.tx.send_if_modified(|current| {
            if next > *current {
                *current = next;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_only_forward() {
        let lc = Lifecycle::new();
        let rx = lc.subscribe();
        assert!(lc.advance(State::Ready));
        assert!(lc.advance(State::Draining));
        assert!(!lc.advance(State::Ready));
        assert_eq!(*rx.borrow(), State::Draining);
        assert!(lc.advance(State::Stopped));
        assert!(!lc.state().is_alive());
    }

    #[test]
    fn probe_semantics_follow_state() {
        assert!(!State::Starting.has_started());
        assert!(!State::Starting.is_ready());
        assert!(State::Starting.is_alive());
        assert!(State::Ready.is_ready());
        assert!(!State::Draining.is_ready());
        assert!(State::Draining.is_alive());
    }
}
