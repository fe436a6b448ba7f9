//! Money: integer micro-USD (µUSD). Decimal strings in, integers everywhere else; no floating point.

use std::fmt;

/// One US dollar in µUSD.
pub const MICROS_PER_USD: u64 = 1_000_000;
/// Prices are quoted per this many tokens.
pub const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("empty amount")]
    Empty,
    #[error(
        "'{0}' is not a decimal amount of USD (expected digits with an optional '.', e.g. 5.00)"
    )]
    Syntax(String),
    #[error("'{0}' has more than 6 decimal places (the ledger counts whole micro-dollars)")]
    TooPrecise(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Parses a non-negative decimal USD string ("5", "5.00", "0.0005") into µUSD, exactly.
pub fn parse_usd(s: &str) -> Result<u64, MoneyError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(MoneyError::Empty);
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, f),
        None => (t, ""),
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(MoneyError::Syntax(s.to_string()));
    }
    if t.contains('.') && frac.is_empty() && int.is_empty() {
        return Err(MoneyError::Syntax(s.to_string()));
    }
    let frac_trimmed = frac.trim_end_matches('0');
    if frac_trimmed.len() > 6 {
        return Err(MoneyError::TooPrecise(s.to_string()));
    }
    let overflow = || MoneyError::Overflow(s.to_string());
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| overflow())?
    };
    let mut micros_frac: u64 = 0;
    for (i, b) in frac_trimmed.bytes().enumerate() {
        micros_frac += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
    }
    whole
        .checked_mul(MICROS_PER_USD)
        .and_then(|w| w.checked_add(micros_frac))
        .ok_or_else(overflow)
}

/// Formats µUSD as a USD decimal with six places, e.g. `5.000000`.
pub fn format_usd(micros: u64) -> String {
    format!("{}.{:06}", micros / MICROS_PER_USD, micros % MICROS_PER_USD)
}

/// µUSD as a decimal USD amount for display.
pub struct Usd(pub u64);

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_usd(self.0))
    }
}

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
    fn parses_exact_decimals() {
        assert_eq!(parse_usd("5"), Ok(5_000_000));
        assert_eq!(parse_usd("5.00"), Ok(5_000_000));
        assert_eq!(parse_usd("0.0005"), Ok(500));
        assert_eq!(parse_usd("0.000001"), Ok(1));
        assert_eq!(parse_usd(".5"), Ok(500_000));
        assert_eq!(parse_usd("3."), Ok(3_000_000));
        assert_eq!(parse_usd("0.075"), Ok(75_000));
        assert_eq!(parse_usd("1.2345600"), Ok(1_234_560));
        assert_eq!(parse_usd(" 2.5 "), Ok(2_500_000));
        assert_eq!(parse_usd("18446744073709.551615"), Ok(u64::MAX));
    }

    #[test]
    fn rejects_bad_amounts() {
        assert_eq!(parse_usd(""), Err(MoneyError::Empty));
        for bad in [
            "-1", "abc", "1e3", "NaN", "inf", "1.2.3", ".", "1,5", "0x10", "١",
        ] {
            assert!(
                matches!(parse_usd(bad), Err(MoneyError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_usd("0.0000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            parse_usd("18446744073709.551616"),
            Err(MoneyError::Overflow(_))
        ));
        assert!(matches!(
            parse_usd("99999999999999999999"),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn formats_six_places() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(5_000_000), "5.000000");
        assert_eq!(format_usd(1_234_567), "1.234567");
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
