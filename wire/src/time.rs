//! Instants on the wire are RFC 3339 UTC strings; inside the coordinator they are milliseconds since the
//! Unix epoch, which survive restarts and compare across processes.

use ::time::format_description::well_known::Rfc3339;
use ::time::OffsetDateTime;

/// Milliseconds since the Unix epoch written as RFC 3339 UTC with millisecond precision,
/// e.g. `2026-11-26T14:39:09.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let format = ::time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format)
        .unwrap_or_else(|_| at.format(&Rfc3339).unwrap_or_default())
}

/// Parses an RFC 3339 instant back into milliseconds since the Unix epoch.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Where a replay of a stream starts: `audit --since`, and the HTTP event streams' `?since=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Since {
    /// The first message kept.
    #[default]
    Start,
    /// The first message stored at or after this instant (Unix milliseconds).
    At(u64),
}

impl Since {
    /// `--since`: an RFC 3339 instant, or a span back from now such as `90s`, `15m`, `2h`, `7d`.
    pub fn parse(text: &str, now_ms: u64) -> Result<Since, String> {
        let text = text.trim();
        let units = [
            ("ms", 1),
            ("s", 1_000),
            ("m", 60_000),
            ("h", 3_600_000),
            ("d", 86_400_000),
        ];
        for (suffix, ms) in units {
            if let Some(n) = text.strip_suffix(suffix) {
                if let Ok(n) = n.parse::<u64>() {
                    return Ok(Since::At(now_ms.saturating_sub(n.saturating_mul(ms))));
                }
            }
        }
        parse_rfc3339(text).map(Since::At).ok_or_else(|| {
            format!(
                "--since {text:?}: expected an RFC 3339 instant (2026-11-28T18:00:00Z) or a span \
                     back from now (90s, 15m, 2h, 7d)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_milliseconds() {
        let ms = 1_795_000_000_123;
        let text = rfc3339(ms);
        assert!(text.ends_with(".123Z"), "{text}");
        assert_eq!(parse_rfc3339(&text), Some(ms));
    }
}
