//! Invariants: what an application declares must always hold, and which
//! operations can run without coordination while it does (I-confluence).
//!
//! Declarations are TOML, one `[[invariant]]` table per key pattern:
//!
//! ```toml
//! [[invariant]]
//! keys = "account/*"
//! type = "counter"
//! min = 0
//!
//! [[invariant]]
//! keys = "username/*"
//! unique = true
//! ```
//!
//! Every key is governed by at most one declaration: two patterns that can
//! match a common key are refused, whatever their rules, so no key ever has to
//! reconcile two rules (put both bounds in one declaration instead).
//!
//! [`Invariants::route`] decides, per operation, whether it runs locally or
//! through the quorum; the verdicts come from [`analysis::verdict`], the same
//! function `GET /v1/invariants`, `GET /v1/explain` and `calmkv explain`
//! report, so what is explained is what happens. [`Invariants::admit`] is the
//! check the quorum (or an embedded single node) runs on the state an
//! operation would leave.
//!
//! Pure: no I/O beyond [`Invariants::load`] reading the file.

pub mod analysis;
mod pattern;

pub use analysis::{Counterexample, OpKind, Verdict};
pub use pattern::Pattern;

use crate::envelope::{Envelope, KeyType};
use crate::op::{Action, Op};
use crate::NodeError;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// Most declarations in one file.
pub const DECLARATIONS_MAX: usize = 1024;
/// Longest declarations file read, in bytes.
pub const FILE_BYTES_MAX: u64 = 1 << 20;

/// The rule a declaration states about its keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Rule {
    /// A counter's value stays within `min..=max` (either bound optional).
    Counter {
        /// Lowest allowed value.
        #[serde(skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        /// Highest allowed value.
        #[serde(skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
    },
    /// A set's size stays within `min_size..=max_size` (either bound optional).
    Set {
        /// Fewest members.
        #[serde(skip_serializing_if = "Option::is_none")]
        min_size: Option<u64>,
        /// Most members.
        #[serde(skip_serializing_if = "Option::is_none")]
        max_size: Option<u64>,
    },
    /// A register key is created at most once (insert-if-absent).
    Unique,
}

impl Rule {
    /// The type of key the rule is about.
    pub fn key_type(&self) -> KeyType {
        match self {
            Rule::Counter { .. } => KeyType::Counter,
            Rule::Set { .. } => KeyType::Set,
            Rule::Unique => KeyType::Register,
        }
    }

    /// Whether `state` satisfies the rule (for `unique`, which is about
    /// history, always: see [`Invariants::admit`]).
    pub fn holds(&self, state: &Envelope) -> bool {
        match *self {
            Rule::Counter { min, max } => {
                let value = state.value.counter().value();
                min.is_none_or(|m| value >= i128::from(m))
                    && max.is_none_or(|m| value <= i128::from(m))
            }
            Rule::Set { min_size, max_size } => {
                let size = state.value.set().len() as u64;
                min_size.is_none_or(|m| size >= m) && max_size.is_none_or(|m| size <= m)
            }
            Rule::Unique => true,
        }
    }

    /// The rule's current quantity in `state`, as a sentence fragment.
    fn describe_state(&self, state: &Envelope) -> String {
        match self {
            Rule::Counter { .. } => format!("the value would be {}", state.value.counter().value()),
            Rule::Set { .. } => format!("the set would have {} members", state.value.set().len()),
            Rule::Unique => "the key already exists".to_string(),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rule::Counter { min, max } => {
                f.write_str("counter")?;
                if let Some(min) = min {
                    write!(f, " min = {min}")?;
                }
                if let Some(max) = max {
                    write!(f, " max = {max}")?;
                }
                Ok(())
            }
            Rule::Set { min_size, max_size } => {
                f.write_str("set")?;
                if let Some(min) = min_size {
                    write!(f, " min_size = {min}")?;
                }
                if let Some(max) = max_size {
                    write!(f, " max_size = {max}")?;
                }
                Ok(())
            }
            Rule::Unique => f.write_str("unique"),
        }
    }
}

/// One declaration: a key pattern and its rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declaration {
    /// The keys it governs.
    pub keys: Pattern,
    /// What must hold for them.
    pub rule: Rule,
}

impl fmt::Display for Declaration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.keys, self.rule)
    }
}

/// Why declarations were refused. Nothing is loaded.
#[derive(Debug, thiserror::Error)]
pub enum InvariantsError {
    /// The file could not be read.
    #[error("cannot read invariants file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is larger than [`FILE_BYTES_MAX`].
    #[error("invariants file {} is larger than {max} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// Not TOML of the expected shape (the message names the line and field).
    #[error("malformed invariants: {message}")]
    Malformed {
        /// What the parser said.
        message: String,
    },
    /// `type` names no known kind of invariant.
    #[error("invariant {index} ({keys:?}): unknown type {kind:?} (expected \"counter\" or \"set\", or `unique = true`)")]
    UnknownKind {
        /// 1-based position in the file.
        index: usize,
        /// Its pattern.
        keys: String,
        /// The type given.
        kind: String,
    },
    /// The declaration's fields do not make a rule.
    #[error("invariant {index} ({keys:?}): {reason}")]
    Invalid {
        /// 1-based position in the file.
        index: usize,
        /// Its pattern.
        keys: String,
        /// What is wrong.
        reason: String,
    },
    /// Two patterns can match the same key.
    #[error("invariants {first_index} ({first:?}) and {second_index} ({second:?}) can both match a key such as {example:?}; every key may have one declaration (put both bounds in one)")]
    Overlap {
        /// 1-based position of the first.
        first_index: usize,
        /// Its pattern.
        first: String,
        /// 1-based position of the second.
        second_index: usize,
        /// Its pattern.
        second: String,
        /// A key both match.
        example: String,
    },
    /// More than [`DECLARATIONS_MAX`] declarations.
    #[error("{count} invariants declared; at most {max} are allowed")]
    TooMany {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    invariant: Vec<RawDeclaration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeclaration {
    keys: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    min: Option<i64>,
    max: Option<i64>,
    min_size: Option<i64>,
    max_size: Option<i64>,
    unique: Option<bool>,
}

impl RawDeclaration {
    fn rule(&self, index: usize) -> Result<Rule, InvariantsError> {
        let invalid = |reason: &str| InvariantsError::Invalid {
            index,
            keys: self.keys.clone(),
            reason: reason.to_string(),
        };
        let counter_bounds = self.min.is_some() || self.max.is_some();
        let size_bounds = self.min_size.is_some() || self.max_size.is_some();
        if self.unique == Some(true) {
            if counter_bounds || size_bounds {
                return Err(invalid("`unique` takes no bounds"));
            }
            return match self.kind.as_deref() {
                None | Some("register") => Ok(Rule::Unique),
                Some(_) => Err(invalid("`unique` applies to registers; drop `type`")),
            };
        }
        if self.unique == Some(false) && self.kind.is_none() {
            return Err(invalid("`unique = false` states nothing; remove the declaration"));
        }
        match self.kind.as_deref() {
            None => Err(invalid("needs `type = \"counter\"` or `\"set\"`, or `unique = true`")),
            Some("counter") => {
                if size_bounds {
                    return Err(invalid("a counter takes `min`/`max`, not `min_size`/`max_size`"));
                }
                match (self.min, self.max) {
                    (None, None) => Err(invalid("a counter invariant needs `min` or `max`")),
                    (Some(min), Some(max)) if min > max => {
                        Err(invalid(&format!("min = {min} is above max = {max}")))
                    }
                    (min, max) => Ok(Rule::Counter { min, max }),
                }
            }
            Some("set") => {
                if counter_bounds {
                    return Err(invalid("a set takes `min_size`/`max_size`, not `min`/`max`"));
                }
                let size = |bound: Option<i64>, name: &str| match bound {
                    Some(n) if n < 0 => Err(invalid(&format!("{name} = {n} is negative"))),
                    other => Ok(other.map(|n| n as u64)),
                };
                let (min_size, max_size) =
                    (size(self.min_size, "min_size")?, size(self.max_size, "max_size")?);
                match (min_size, max_size) {
                    (None, None) => Err(invalid("a set invariant needs `min_size` or `max_size`")),
                    (Some(min), Some(max)) if min > max => {
                        Err(invalid(&format!("min_size = {min} is above max_size = {max}")))
                    }
                    _ => Ok(Rule::Set { min_size, max_size }),
                }
            }
            Some(kind) => Err(InvariantsError::UnknownKind {
                index,
                keys: self.keys.clone(),
                kind: kind.to_string(),
            }),
        }
    }
}

/// Where an operation runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Locally, without coordination.
    Local,
    /// Through the quorum, which admits it only while the invariant holds.
    Quorum {
        /// The declaration that requires it.
        declaration: &'a Declaration,
        /// The operation's kinds that need the quorum.
        kinds: Vec<OpKind>,
    },
}

/// A set of declarations, at most one per key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invariants {
    declarations: Vec<Declaration>,
}

impl Invariants {
    /// No declarations: every operation is local.
    pub fn none() -> Invariants {
        Invariants::default()
    }

    /// Parses declarations from TOML text.
    pub fn parse(text: &str) -> Result<Invariants, InvariantsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| InvariantsError::Malformed {
            message: e.to_string().trim_end().to_string(),
        })?;
        if raw.invariant.len() > DECLARATIONS_MAX {
            return Err(InvariantsError::TooMany {
                count: raw.invariant.len(),
                max: DECLARATIONS_MAX,
            });
        }
        let mut declarations: Vec<Declaration> = Vec::with_capacity(raw.invariant.len());
        for (i, entry) in raw.invariant.iter().enumerate() {
            let index = i + 1;
            let keys = Pattern::new(&entry.keys).map_err(|reason| InvariantsError::Invalid {
                index,
                keys: entry.keys.clone(),
                reason: reason.to_string(),
            })?;
            let rule = entry.rule(index)?;
            for (j, earlier) in declarations.iter().enumerate() {
                if let Some(example) = earlier.keys.overlap_example(&keys) {
                    return Err(InvariantsError::Overlap {
                        first_index: j + 1,
                        first: earlier.keys.to_string(),
                        second_index: index,
                        second: keys.to_string(),
                        example,
                    });
                }
            }
            declarations.push(Declaration { keys, rule });
        }
        Ok(Invariants { declarations })
    }

    /// Reads and parses a declarations file.
    pub fn load(path: &Path) -> Result<Invariants, InvariantsError> {
        let io = |source| InvariantsError::Io { path: path.to_path_buf(), source };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > FILE_BYTES_MAX {
            return Err(InvariantsError::TooLarge {
                path: path.to_path_buf(),
                max: FILE_BYTES_MAX,
            });
        }
        Invariants::parse(&std::fs::read_to_string(path).map_err(io)?)
    }

    /// The declarations, in file order.
    pub fn declarations(&self) -> &[Declaration] {
        &self.declarations
    }

    /// A stable hash of the declarations: equal for equal rules on equal
    /// patterns whatever their order, spacing or comments in the file, on
    /// every node and every build. Nodes publish it in their gossip metadata.
    pub fn hash(&self) -> u64 {
        let mut lines: Vec<String> = self.declarations.iter().map(ToString::to_string).collect();
        lines.sort();
        let digest = Sha256::digest(lines.join("\n").as_bytes());
        u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
    }

    /// The declaration governing `key`, if any.
    pub fn rule_for(&self, key: &str) -> Option<&Declaration> {
        self.declarations.iter().find(|d| d.keys.matches(key))
    }

    /// Where `op` runs: locally, or through the quorum because one of its
    /// kinds is not I-confluent for the key's invariant. An operation of
    /// another type than the declaration's is refused (`type_mismatch`).
    pub fn route(&self, op: &Op) -> Result<Route<'_>, NodeError> {
        let Some(declaration) = self.rule_for(op.key.as_str()) else { return Ok(Route::Local) };
        let kinds =
            OpKind::of(op, declaration.rule.key_type()).ok_or_else(|| NodeError::TypeMismatch {
                key: op.key.to_string(),
                wanted: declaration.rule.key_type(),
                found: format!(
                    "an operation for another type (the key is declared `{}`)",
                    declaration
                ),
            })?;
        let kinds: Vec<OpKind> = kinds
            .into_iter()
            .filter(|kind| !analysis::verdict(&declaration.rule, *kind).confluent)
            .collect();
        Ok(if kinds.is_empty() { Route::Local } else { Route::Quorum { declaration, kinds } })
    }

    /// The admission check of an operation that needs coordination: `before`
    /// is the coordinator's view of the key, `after` that view with the
    /// operation applied. For `unique`, a creation is admitted only if the key
    /// had no live value (`precondition_failed` otherwise); for bounds, only if
    /// `after` satisfies the rule (`invariant_violation` otherwise).
    pub fn admit(
        declaration: &Declaration,
        kinds: &[OpKind],
        key: &str,
        before: &Envelope,
        after: &Envelope,
    ) -> Result<(), NodeError> {
        match declaration.rule {
            Rule::Unique if kinds.contains(&OpKind::Create) && !before.is_empty() => {
                Err(NodeError::PreconditionFailed { key: key.to_string() })
            }
            _ if declaration.rule.holds(after) => Ok(()),
            _ => Err(NodeError::InvariantViolation {
                key: key.to_string(),
                violation: format!(
                    "refused by invariant `{declaration}`: {}",
                    declaration.rule.describe_state(after)
                ),
            }),
        }
    }
}

/// For a key declared `unique`, a write without a context is a creation:
/// it may only succeed where the key is absent, so it runs as
/// insert-if-absent. Other operations are returned unchanged.
pub fn as_creation(op: &Op, route: &Route<'_>) -> Op {
    let creating = matches!(route, Route::Quorum { declaration, kinds }
        if declaration.rule == Rule::Unique && kinds.contains(&OpKind::Create));
    match &op.action {
        Action::Put { value, context, .. } if creating => Op {
            key: op.key.clone(),
            action: Action::Put { value: value.clone(), context: context.clone(), if_absent: true },
        },
        _ => op.clone(),
    }
}
