//! Tokens per minute: a sliding one-minute log of the tokens of each request an agent was
//! admitted for. A request counts its worst case (input bound + every output token it may
//! produce) from admission until it settles, then the tokens it really used (none when
//! released); it leaves the window a minute after its admission, as a request leaves the RPM
//! window. Exact across Envoy workers because every admission of an agent with a TPM limit goes
//! through the ledger (such agents get no leases).

use std::collections::VecDeque;

use super::MINUTE_MS;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    at_ms: i64,
    tokens: u64,
    /// The request's id key while it is in flight (its tokens are the worst case).
    pending: Option<u64>,
}

/// One agent's token log, oldest first.
#[derive(Debug, Default, Clone)]
pub struct TokenWindow {
    entries: VecDeque<Entry>,
    used: u64,
}

impl TokenWindow {
    fn prune(&mut self, now_ms: i64) {
        while let Some(e) = self.entries.front() {
            if e.at_ms + MINUTE_MS > now_ms {
                break;
            }
            self.used = self.used.saturating_sub(e.tokens);
            self.entries.pop_front();
        }
    }

    /// Tokens counted in the minute before `now_ms`.
    pub fn used(&mut self, now_ms: i64) -> u64 {
        self.prune(now_ms);
        self.used
    }

    /// Counts an admitted request at its worst case; `pending` is its id key until it settles
    /// (`None` when the count is already final).
    pub fn admit(&mut self, at_ms: i64, tokens: u64, pending: Option<u64>) {
        // Entries stay in time order (a clock step back files the entry with the newest).
        let at_ms = self.entries.back().map_or(at_ms, |e| e.at_ms.max(at_ms));
        self.entries.push_back(Entry {
            at_ms,
            tokens,
            pending,
        });
        self.used = self.used.saturating_add(tokens);
    }

    /// Replaces a pending request's worst case with the tokens it used. A request no longer in
    /// the window (settled more than a minute after admission) changes nothing.
    pub fn settle(&mut self, id_key: u64, tokens: u64) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .rev()
            .find(|e| e.pending == Some(id_key))
        {
            self.used = self.used.saturating_sub(e.tokens).saturating_add(tokens);
            e.tokens = tokens;
            e.pending = None;
        }
    }

    /// Milliseconds until `need` more tokens fit under `limit`, as requests leave the window;
    /// `None` when they never can (`need` alone exceeds the limit). When requests in flight hold
    /// the room, a second: they settle at what they used, usually far below their worst case.
    pub fn wait_ms(&mut self, now_ms: i64, need: u64, limit: u64) -> Option<i64> {
        if need > limit {
            return None;
        }
        let mut used = self.used(now_ms);
        if used.saturating_add(need) <= limit {
            return Some(0);
        }
        let in_flight = self
            .entries
            .iter()
            .filter(|e| e.pending.is_some())
            .fold(0u64, |sum, e| sum.saturating_add(e.tokens));
        if used.saturating_sub(in_flight).saturating_add(need) <= limit {
            return Some(1_000);
        }
        for e in &self.entries {
            used = used.saturating_sub(e.tokens);
            if used.saturating_add(need) <= limit {
                return Some((e.at_ms + MINUTE_MS - now_ms).max(1));
            }
        }
        Some(MINUTE_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_cases_count_until_settled_and_everything_leaves_after_a_minute() {
        let mut w = TokenWindow::default();
        w.admit(0, 1_000, Some(1));
        w.admit(10_000, 500, Some(2));
        assert_eq!(w.used(20_000), 1_500);
        // The first used 120 of its 1,000; the second was released.
        w.settle(1, 120);
        w.settle(2, 0);
        assert_eq!(w.used(20_000), 120);
        // Settling twice, or an unknown id, changes nothing.
        w.settle(1, 999);
        w.settle(7, 5);
        assert_eq!(w.used(20_000), 120);
        assert_eq!(w.used(59_999), 120);
        assert_eq!(w.used(60_000), 0, "the first left the window at 60 s");
        assert_eq!(
            w.entries.len(),
            1,
            "the released one is still logged until 70 s"
        );
        assert_eq!(w.used(70_000), 0);
        assert!(w.entries.is_empty());
    }

    #[test]
    fn the_wait_is_until_enough_tokens_leave_the_window() {
        let mut w = TokenWindow::default();
        w.admit(0, 400, None);
        w.admit(5_000, 300, None);
        w.admit(9_000, 200, Some(3));
        // Limit 1,000, 900 used, 200 of them by a request in flight.
        assert_eq!(w.wait_ms(10_000, 100, 1_000), Some(0));
        assert_eq!(
            w.wait_ms(10_000, 300, 1_000),
            Some(1_000),
            "the one in flight may free it when it settles"
        );
        assert_eq!(
            w.wait_ms(10_000, 400, 1_000),
            Some(50_000),
            "the first frees 400 at 60 s"
        );
        assert_eq!(w.wait_ms(10_000, 700, 1_000), Some(55_000));
        assert_eq!(w.wait_ms(10_000, 1_000, 1_000), Some(59_000));
        assert_eq!(w.wait_ms(10_000, 1_001, 1_000), None, "never fits");
    }

    #[test]
    fn a_clock_step_back_keeps_the_log_in_order() {
        let mut w = TokenWindow::default();
        w.admit(10_000, 5, None);
        w.admit(9_000, 7, None);
        assert_eq!(w.used(69_999), 12);
        assert_eq!(w.used(70_000), 0);
    }
}
