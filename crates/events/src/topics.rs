//! Topic names, partition counts and partition keys: the one place they are
//! defined. Every component asks a [`Topology`] instead of spelling a name.

use crate::event::{Envelope, Event};

/// Default prefix of every topic name.
pub const DEFAULT_PREFIX: &str = "paystream.";
/// Default partition count of every topic. Kafka cannot shrink partitions
/// and changing the count re-maps keys, so pick the final count up front
/// (it bounds how many consumers of one group can share the work).
pub const DEFAULT_PARTITIONS: i32 = 12;

/// The topics paystream owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Payment requests produced straight by upstream services (Avro
    /// envelopes with a `PaymentRequested` payload). Consumed by the payment
    /// handler, which validates, risk-checks and re-appends to `Payments`.
    Inbound,
    /// The payment flow, the system of record: requests, risk decisions,
    /// executions, outcomes, refunds. Key: payment id.
    Payments,
    /// Reconciliation discrepancies, their resolutions and completed runs.
    /// Key: payment id when known, else discrepancy id (run id for runs).
    Reconciliation,
    /// Dead letters: the original bytes and headers of messages a consumer
    /// could not decode or apply, plus `dlq.*` headers saying why.
    DeadLetter,
}

impl TopicKind {
    pub const ALL: &'static [TopicKind] = &[
        TopicKind::Inbound,
        TopicKind::Payments,
        TopicKind::Reconciliation,
        TopicKind::DeadLetter,
    ];

    /// Name without prefix.
    pub fn suffix(&self) -> &'static str {
        match self {
            TopicKind::Inbound => "payments.inbound",
            TopicKind::Payments => "payments",
            TopicKind::Reconciliation => "reconciliation",
            TopicKind::DeadLetter => "dlq",
        }
    }
}

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub kind: TopicKind,
    pub name: String,
    pub partitions: i32,
}

/// The concrete topic names of one deployment (or one test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    partitions: i32,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new(DEFAULT_PREFIX, DEFAULT_PARTITIONS)
    }
}

impl Topology {
    /// `prefix` is prepended verbatim (include the separator, e.g.
    /// `"paystream."`); tests use a unique prefix so they never share topics.
    pub fn new(prefix: impl Into<String>, partitions: i32) -> Topology {
        assert!(partitions > 0, "a topic needs at least one partition");
        Topology {
            prefix: prefix.into(),
            partitions,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    pub fn name(&self, kind: TopicKind) -> String {
        format!("{}{}", self.prefix, kind.suffix())
    }

    pub fn specs(&self) -> Vec<TopicSpec> {
        TopicKind::ALL
            .iter()
            .map(|&kind| TopicSpec {
                kind,
                name: self.name(kind),
                partitions: self.partitions,
            })
            .collect()
    }

    /// A consumer-group name scoped like the topics (`{prefix}{name}`), so
    /// two deployments (or two tests) sharing a cluster never share a group.
    pub fn group(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Which topic a (validated) event is appended to.
    pub fn topic_for(&self, envelope: &Envelope) -> String {
        match envelope.event {
            Event::ReconciliationDiscrepancyFound(_)
            | Event::ReconciliationDiscrepancyResolved(_)
            | Event::ReconciliationRunCompleted(_) => self.name(TopicKind::Reconciliation),
            _ => self.name(TopicKind::Payments),
        }
    }

    /// The kind of one of our topic names, if it is one.
    pub fn kind_of(&self, topic: &str) -> Option<TopicKind> {
        TopicKind::ALL
            .iter()
            .copied()
            .find(|k| self.name(*k) == topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_and_distinct() {
        let t = Topology::new("t1.", 3);
        let names: Vec<_> = t.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "t1.payments.inbound",
                "t1.payments",
                "t1.reconciliation",
                "t1.dlq"
            ]
        );
        assert_eq!(t.kind_of("t1.dlq"), Some(TopicKind::DeadLetter));
        assert_eq!(t.kind_of("t2.dlq"), None);
    }
}
