//! The abuse budget and the deny aggregation: a session
//! that keeps sending refused input is closed, and refusals of one reason
//! past the first few are counted and summed up instead of logged one by
//! one, so one client can never blind the deny log for the others.

use std::time::{Duration, Instant};

use super::Session;
use super::output::Route;
use super::types::{CloseReason, Event};
use crate::proto::Side;
use crate::proto::deny::{Denial, DenyReason};

/// Deny events of one reason a session emits one by one; further ones are
/// counted.
pub(super) const DENY_BURST: u32 = 5;

/// Counted refusals are summed up at most this often (and when the session
/// closes).
pub(super) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Sent instead of the answer to the refused line that exhausts the budget.
pub(super) const TOO_MANY_REFUSALS: &str =
    "421 Too many refused commands: closing control connection.";

/// Per reason: how many deny events were emitted, how many counted since
/// the last summary.
#[derive(Debug, Default)]
pub(super) struct DenyTally {
    /// In order of each reason's first refusal, so summaries come out in a
    /// fixed order. A session meets few reasons: a list is enough.
    reasons: Vec<Tally>,
    /// When the counted refusals are summed up next; `None` while nothing
    /// is counted.
    summary_due: Option<Instant>,
}

#[derive(Debug)]
struct Tally {
    reason: DenyReason,
    logged: u32,
    suppressed: u64,
    /// The side of the latest counted refusal.
    side: Side,
}

impl DenyTally {
    /// Whether `denial` is emitted on its own; if not, it is counted for
    /// the next summary, due one interval after the first count.
    fn admit(&mut self, denial: &Denial, now: Instant) -> bool {
        let i = match self.reasons.iter().position(|t| t.reason == denial.reason) {
            Some(i) => i,
            None => {
                self.reasons.push(Tally {
                    reason: denial.reason,
                    logged: 0,
                    suppressed: 0,
                    side: denial.side,
                });
                self.reasons.len() - 1
            }
        };
        let tally = &mut self.reasons[i];
        if tally.logged < DENY_BURST {
            tally.logged += 1;
            return true;
        }
        tally.suppressed += 1;
        tally.side = denial.side;
        self.summary_due.get_or_insert(now + SUMMARY_INTERVAL);
        false
    }

    pub(super) fn summary_due(&self) -> Option<Instant> {
        self.summary_due
    }

    /// One summary per reason with counted refusals; the counts restart.
    fn summaries(&mut self) -> Vec<Denial> {
        self.summary_due = None;
        self.reasons
            .iter_mut()
            .filter(|t| t.suppressed > 0)
            .map(|t| {
                let mut summary = Denial::new(t.reason, t.side);
                summary.suppressed = Some(std::mem::take(&mut t.suppressed));
                summary
            })
            .collect()
    }
}

impl Session {
    /// Every deny event goes through here: emitted, or counted once this
    /// session has emitted [`DENY_BURST`] of its reason.
    pub(super) fn log_denial(&mut self, denial: Denial) {
        if self.tally.admit(&denial, self.clock) {
            self.events.push_back(Event::Deny(denial));
        }
    }

    /// Emits the summaries of the refusals counted so far: a normal deny
    /// event per reason, carrying the count in `suppressed`.
    pub(super) fn log_summaries(&mut self) {
        for summary in self.tally.summaries() {
            self.events.push_back(Event::Deny(summary));
        }
    }

    /// A refused client line: answered in command order and counted against
    /// the session's budget. The line that would go past the budget is not
    /// answered: the session closes with 421 instead, and that closing is
    /// its one deny event (`refusal_budget`, with the line's verb and
    /// target). Refusals of server lines, and pinholes the gateway could not
    /// open, never come here: they are not the client's doing.
    pub(super) fn refuse_client(&mut self, denial: Denial, reply: &str) {
        if self.refusals < self.cfg.max_refusals {
            self.refusals += 1;
            return self.refuse(denial, reply, Route::Queued);
        }
        let mut closing =
            Denial::new(DenyReason::RefusalBudget, Side::Client).rule("max_refused_commands");
        closing.verb = denial.verb;
        closing.argument = denial.argument;
        closing.target = denial.target;
        closing.reply = Some(TOO_MANY_REFUSALS.to_string());
        self.log_denial(closing);
        self.close_with_reply(TOO_MANY_REFUSALS, CloseReason::RefusalBudget);
    }
}
