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
    /// How long this agent's requests have lately taken from admission to settlement (a moving
    /// average): when requests in flight hold the room, a refused one is told to come back
    /// when they are likely to have settled.
    typical_ms: Option<i64>,
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
    pub fn settle(&mut self, id_key: u64, tokens: u64, now_ms: i64) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .rev()
            .find(|e| e.pending == Some(id_key))
        {
            self.used = self.used.saturating_sub(e.tokens).saturating_add(tokens);
            e.tokens = tokens;
            e.pending = None;
            let took = now_ms.saturating_sub(e.at_ms).clamp(0, MINUTE_MS);
            self.typical_ms = Some(match self.typical_ms {
                Some(t) => t + (took - t) / 4,
                None => took,
            });
        }
    }

    /// Milliseconds until `need` more tokens fit under `limit`, as requests leave the window;
    /// `None` when they never can (`need` alone exceeds the limit). When requests in flight hold
    /// the room (they settle at what they used, usually far below their worst case), until the
    /// oldest of them is likely to have settled, going by how long this agent's requests have
    /// lately taken: at least a second, and never past when the window frees the room anyway.
    /// (A flat second made a client whose streams run for tens of seconds spend its retries —
    /// the openai SDK makes two — and fail.)
    pub fn wait_ms(&mut self, now_ms: i64, need: u64, limit: u64) -> Option<i64> {
        if need > limit {
            return None;
        }
        let mut used = self.used(now_ms);
        if used.saturating_add(need) <= limit {
            return Some(0);
        }
        let mut leaving = MINUTE_MS;
        for e in &self.entries {
            used = used.saturating_sub(e.tokens);
            if used.saturating_add(need) <= limit {
                leaving = (e.at_ms + MINUTE_MS - now_ms).max(1);
                break;
            }
        }
        let pending = self.entries.iter().filter(|e| e.pending.is_some());
        let in_flight = pending
            .clone()
            .fold(0u64, |sum, e| sum.saturating_add(e.tokens));
        if self.used.saturating_sub(in_flight).saturating_add(need) > limit {
            return Some(leaving);
        }
        let oldest = pending.map(|e| e.at_ms).min().unwrap_or(now_ms);
        let settles = oldest
            .saturating_add(self.typical_ms.unwrap_or(0))
            .saturating_sub(now_ms);
        Some(settles.clamp(1_000, MINUTE_MS).min(leaving.max(1_000)))
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
        w.settle(1, 120, 20_000);
        w.settle(2, 0, 20_000);
        assert_eq!(w.used(20_000), 120);
        // Settling twice, or an unknown id, changes nothing.
        w.settle(1, 999, 20_000);
        w.settle(7, 5, 20_000);
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
    fn requests_in_flight_are_waited_for_as_long_as_this_agent_s_requests_take() {
        let mut w = TokenWindow::default();
        // Two earlier requests took 20 s and 24 s: the average moves toward each.
        w.admit(0, 100, Some(1));
        w.settle(1, 10, 20_000);
        w.admit(1_000, 100, Some(2));
        w.settle(2, 10, 25_000);
        assert_eq!(w.typical_ms, Some(21_000));
        // One in flight since 30 s holds 900 of 1,000: at 35 s it is likely to settle at 51 s.
        w.admit(30_000, 900, Some(3));
        assert_eq!(w.wait_ms(35_000, 500, 1_000), Some(16_000));
        // Overdue: a second.
        assert_eq!(w.wait_ms(55_000, 500, 1_000), Some(1_000));
        assert_eq!(w.wait_ms(40_000, 90, 1_000), Some(11_000));

        // Never past the time the window frees the room anyway.
        let mut w = TokenWindow::default();
        w.admit(0, 100, Some(1));
        w.settle(1, 100, 40_000);
        w.admit(45_000, 800, Some(2));
        // Likely to settle at 85 s, but the first leaves the window at 60 s.
        assert_eq!(w.wait_ms(50_000, 150, 1_000), Some(10_000));
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
