//! Money: integer micro-USD (µUSD). Decimal strings in, integers everywhere else; no floating point.

use std::fmt;

/// One US dollar in µUSD.
pub const MICROS_PER_USD: u64 = 1_000_000;
pub use aex_proto::money::TOKENS_PER_PRICE_UNIT;

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
    parse_decimal(s, false)
}

/// [`parse_usd`] for prices in `models.toml`: zeros beyond the sixth decimal are tolerated there
/// ("0.1500000" loaded before the CLI's budgets became strict, and means the same), other digits
/// are not.
pub fn parse_price(s: &str) -> Result<u64, MoneyError> {
    parse_decimal(s, true)
}

fn parse_decimal(s: &str, zeros_past_six: bool) -> Result<u64, MoneyError> {
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
    // SPEC §3: more than 6 decimals is an error, even when the extra digits are zeros ("1.0000000"
    // asks for a precision the ledger does not have); prices may carry zeros past the sixth.
    if frac.len() > 6 && !(zeros_past_six && frac[6..].bytes().all(|b| b == b'0')) {
        return Err(MoneyError::TooPrecise(s.to_string()));
    }
    let frac_trimmed = frac.trim_end_matches('0');
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

pub use aex_proto::money::{affordable_output, charge, cost, worst_case, Prices, TokenUsage};

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
        assert_eq!(parse_usd("1.234560"), Ok(1_234_560));
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
        for bad in ["0.0000001", "1.0000000", "1.2345600"] {
            assert!(
                matches!(parse_usd(bad), Err(MoneyError::TooPrecise(_))),
                "{bad}"
            );
        }
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
    fn prices_tolerate_trailing_zeros_only() {
        assert_eq!(parse_price("0.1500000"), Ok(150_000));
        assert_eq!(parse_price("0.15"), Ok(150_000));
        assert!(matches!(
            parse_price("0.1500001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            parse_price("x.0000000"),
            Err(MoneyError::Syntax(_))
        ));
    }

    #[test]
    fn formats_six_places() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(5_000_000), "5.000000");
        assert_eq!(format_usd(1_234_567), "1.234567");
    }
}
