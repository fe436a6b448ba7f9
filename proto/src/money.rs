//! Money arithmetic both sides must agree on: the daemon when it reserves and settles, the filter
//! when it admits a request under a lease. Integer micro-USD (µUSD) only; no floating point.

/// Prices are quoted per this many tokens.
pub const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

/// A model's prices, in µUSD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    /// Price of cached input tokens; `None` = same as `input`.
    pub cached_input: Option<u64>,
}

/// Token counts of one request, as reported by the provider (or estimated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    /// Part of `input` served from the provider's prompt cache.
    pub cached_input: u64,
}

/// ceil(numerator / 1M) as µUSD, saturating at u64::MAX (a charge that large exceeds any budget).
fn micros_from_scaled(numerator: u128) -> u64 {
    let micros = numerator.div_ceil(TOKENS_PER_PRICE_UNIT);
    u64::try_from(micros).unwrap_or(u64::MAX)
}

/// Cost of actual usage: ceil((uncached·in + cached·cached_in + out·out_price) / 1M) µUSD.
pub fn cost(prices: Prices, usage: TokenUsage) -> u64 {
    let cached = usage.cached_input.min(usage.input);
    let uncached = usage.input - cached;
    let cached_price = prices.cached_input.unwrap_or(prices.input);
    // Each product fits u128; only the sums can overflow, and only for absurd inputs.
    let n = (u128::from(uncached) * u128::from(prices.input))
        .saturating_add(u128::from(cached) * u128::from(cached_price))
        .saturating_add(u128::from(usage.output) * u128::from(prices.output));
    micros_from_scaled(n)
}

/// Most one settlement can charge, in µUSD ($281M): a provider reporting an absurd token count
/// is charged this (an overrun that blocks the agent), so spent totals and the audit log's sums
/// stay far inside 64-bit signed range even after thousands of such reports.
pub const MAX_CHARGE_MICROS: u64 = 1 << 48;

/// What a settlement charges for `usage`: its cost, capped at [`MAX_CHARGE_MICROS`].
pub fn charge(prices: Prices, usage: TokenUsage) -> u64 {
    cost(prices, usage).min(MAX_CHARGE_MICROS)
}

/// Worst-case cost of a request before it runs: every input token at the full input price and
/// every allowed output token at the output price.
pub fn worst_case(prices: Prices, input_bound: u64, output_cap_total: u64) -> u64 {
    cost(
        prices,
        TokenUsage {
            input: input_bound,
            output: output_cap_total,
            cached_input: 0,
        },
    )
}

/// The largest total output-token count whose worst case fits `available` µUSD, given the input
/// bound; `None` if not even the input fits. `Some(u64::MAX)` when output is free.
pub fn affordable_output(prices: Prices, input_bound: u64, available: u64) -> Option<u64> {
    let input_scaled = u128::from(input_bound) * u128::from(prices.input);
    let budget_scaled = u128::from(available) * TOKENS_PER_PRICE_UNIT; // < 2^84
    let left = budget_scaled.checked_sub(input_scaled)?;
    if prices.output == 0 {
        return Some(u64::MAX);
    }
    Some(u64::try_from(left / u128::from(prices.output)).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_is_capped_where_a_cost_saturates() {
        let p = Prices {
            input: u64::MAX,
            output: u64::MAX,
            cached_input: None,
        };
        let absurd = TokenUsage {
            input: u64::MAX,
            output: u64::MAX,
            cached_input: 0,
        };
        assert_eq!(cost(p, absurd), u64::MAX);
        assert_eq!(charge(p, absurd), MAX_CHARGE_MICROS);
        let small = TokenUsage {
            input: 10,
            output: 10,
            cached_input: 0,
        };
        let q = Prices {
            input: 1_000_000,
            output: 2_000_000,
            cached_input: None,
        };
        assert_eq!(charge(q, small), cost(q, small));
        assert_eq!(charge(q, small), 30);
    }

    #[test]
    fn cost_rounds_up_to_the_micro() {
        let p = Prices {
            input: 75_000,
            output: 300_000,
            cached_input: None,
        };
        // 10 in × 0.075 $/M = 0.75 µUSD, 10 out × 0.30 $/M = 3 µUSD → 3.75 → 4.
        assert_eq!(
            cost(
                p,
                TokenUsage {
                    input: 10,
                    output: 10,
                    cached_input: 0
                }
            ),
            4
        );
        assert_eq!(cost(p, TokenUsage::default()), 0);
        // 1M input tokens at 0.075 $/M is exactly 75_000 µUSD.
        assert_eq!(
            cost(
                p,
                TokenUsage {
                    input: 1_000_000,
                    output: 0,
                    cached_input: 0
                }
            ),
            75_000
        );
        assert_eq!(
            cost(
                p,
                TokenUsage {
                    input: 1_000_001,
                    output: 0,
                    cached_input: 0
                }
            ),
            75_001
        );
    }

    #[test]
    fn cached_tokens_use_their_price() {
        let p = Prices {
            input: 1_000_000,
            output: 0,
            cached_input: Some(500_000),
        };
        let u = TokenUsage {
            input: 1_000_000,
            output: 0,
            cached_input: 400_000,
        };
        assert_eq!(cost(p, u), 600_000 + 200_000);
        // Cached counts above the input count are capped, never negative.
        let u = TokenUsage {
            input: 10,
            output: 0,
            cached_input: 50,
        };
        assert_eq!(cost(p, u), 5);
    }

    #[test]
    fn cost_never_overflows() {
        let p = Prices {
            input: u64::MAX,
            output: u64::MAX,
            cached_input: None,
        };
        let u = TokenUsage {
            input: u64::MAX,
            output: u64::MAX,
            cached_input: 0,
        };
        assert_eq!(cost(p, u), u64::MAX);
    }

    #[test]
    fn affordable_output_is_the_largest_that_fits() {
        let p = Prices {
            input: 1_000_000,
            output: 2_000_000,
            cached_input: None,
        };
        // 100 µUSD available, 40 input tokens cost 40 µUSD, 60 left → 30 output tokens.
        assert_eq!(affordable_output(p, 40, 100), Some(30));
        assert!(worst_case(p, 40, 30) <= 100);
        assert!(worst_case(p, 40, 31) > 100);
        assert_eq!(affordable_output(p, 101, 100), None);
        let free_out = Prices { output: 0, ..p };
        assert_eq!(affordable_output(free_out, 1, 100), Some(u64::MAX));
    }

    #[test]
    fn affordable_output_matches_worst_case_on_odd_prices() {
        let p = Prices {
            input: 75_000,
            output: 300_000,
            cached_input: None,
        };
        for available in [0u64, 1, 7, 999, 12_345, 5_000_000] {
            for input in [0u64, 1, 13, 1_000, 77_777] {
                if let Some(out) = affordable_output(p, input, available) {
                    assert!(
                        worst_case(p, input, out) <= available,
                        "{available} {input} {out}"
                    );
                    assert!(worst_case(p, input, out + 1) > available || out == u64::MAX);
                } else {
                    assert!(worst_case(p, input, 0) > available);
                }
            }
        }
    }
}
