//! What the clients did: one [`Event`] per operation.

/// A point in the simulation's logical time.
pub type Time = u64;

/// How an operation ended, as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<R> {
    /// Acknowledged, with what it returned.
    Ok(R),
    /// Refused: it changed nothing.
    Failed,
    /// Unknown: it may or may not have taken effect (a lost answer, a crash,
    /// a timeout). It may take effect at any time after its invocation.
    Indeterminate,
}

impl<R> Outcome<R> {
    /// The same outcome with the acknowledged value mapped.
    pub fn map<S>(self, f: impl FnOnce(R) -> S) -> Outcome<S> {
        match self {
            Outcome::Ok(r) => Outcome::Ok(f(r)),
            Outcome::Failed => Outcome::Failed,
            Outcome::Indeterminate => Outcome::Indeterminate,
        }
    }
}

/// One client operation.
#[derive(Clone, Debug)]
pub struct Event<O, R> {
    /// The replica (or client session) it ran against.
    pub process: usize,
    /// When it was invoked.
    pub invoked: Time,
    /// When its answer arrived; [`Time::MAX`] while pending or indeterminate.
    pub completed: Time,
    /// What was asked.
    pub op: O,
    /// How it ended.
    pub outcome: Outcome<R>,
}

impl<O, R> Event<O, R> {
    /// Acknowledged.
    pub fn ok(&self) -> Option<&R> {
        match &self.outcome {
            Outcome::Ok(r) => Some(r),
            _ => None,
        }
    }

    /// Acknowledged or indeterminate: it may have taken effect.
    pub fn attempted(&self) -> bool {
        !matches!(self.outcome, Outcome::Failed)
    }

    /// It completed (acknowledged) before `other` was invoked: real-time order.
    pub fn precedes<O2, R2>(&self, other: &Event<O2, R2>) -> bool {
        matches!(self.outcome, Outcome::Ok(_)) && self.completed < other.invoked
    }
}

/// Operations in the order they were invoked, and crashes of processes.
#[derive(Clone, Debug)]
pub struct History<O, R> {
    /// The operations, in invocation order.
    pub events: Vec<Event<O, R>>,
    /// Crashes: (process, time). What a process showed before a crash under a
    /// lossy durability mode need not survive it.
    pub crashes: Vec<(usize, Time)>,
    clock: Time,
}

impl<O, R> Default for History<O, R> {
    fn default() -> Self {
        History { events: Vec::new(), crashes: Vec::new(), clock: 0 }
    }
}

impl<O, R> History<O, R> {
    /// An empty history.
    pub fn new() -> Self {
        History::default()
    }

    /// The next logical time.
    pub fn tick(&mut self) -> Time {
        self.clock += 1;
        self.clock
    }

    /// Records an invocation; complete it with [`History::complete`].
    pub fn invoke(&mut self, process: usize, op: O) -> usize {
        let invoked = self.tick();
        self.events.push(Event {
            process,
            invoked,
            completed: Time::MAX,
            op,
            outcome: Outcome::Indeterminate,
        });
        self.events.len() - 1
    }

    /// Records how invocation `id` ended. An indeterminate outcome stays
    /// pending forever.
    pub fn complete(&mut self, id: usize, outcome: Outcome<R>) {
        let completed = self.tick();
        let event = &mut self.events[id];
        if !matches!(outcome, Outcome::Indeterminate) {
            event.completed = completed;
        }
        event.outcome = outcome;
    }

    /// Invokes and completes at once (an operation of a synchronous client).
    pub fn record(&mut self, process: usize, op: O, outcome: Outcome<R>) -> usize {
        let id = self.invoke(process, op);
        self.complete(id, outcome);
        id
    }

    /// Records a crash of `process` now.
    pub fn crash(&mut self, process: usize) {
        let now = self.tick();
        self.crashes.push((process, now));
    }

    /// Whether `process` crashed strictly between `from` and `to`.
    pub fn crashed_between(&self, process: usize, from: Time, to: Time) -> bool {
        self.crashes.iter().any(|&(p, t)| p == process && from < t && t < to)
    }

    /// The number of operations.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Why a history is not allowed: the events involved, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A checker's verdict.
pub type Verdict = Result<(), Violation>;

/// Fails with a formatted [`Violation`].
#[macro_export]
macro_rules! violation {
    ($($arg:tt)*) => {
        return Err($crate::checkers::history::Violation(format!($($arg)*)))
    };
}
