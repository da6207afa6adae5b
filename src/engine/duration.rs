//! Durations as people write them: `30s`, `10m`, `1h 30m`, `500ms`, or a
//! bare number of seconds, as `sleep 15` and `timeout 15` read it.
//!
//! One parser for every duration the box reads (flags, the config file,
//! alert rules, workflow files), so `--wait 15` and `default_ttl = "15"`
//! mean the same thing and are refused the same way.

use std::str::FromStr;
use std::time::Duration;

/// What to write, for error messages.
pub const HINT: &str = "write e.g. 30s, 5m, 1h30m, 500ms, or a number of seconds";

/// Parse a duration: a bare number is seconds; otherwise humantime's units.
/// A negative or empty value is refused naming what was given.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("an empty duration; {HINT}"));
    }
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative; a duration is 0 or more ({HINT})"
        ));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{s}` is too many seconds; {HINT}"));
    }
    humantime::parse_duration(t).map_err(|e| format!("`{s}` is not a duration ({e}); {HINT}"))
}

/// A duration flag (clap parses it through [`parse`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationArg(pub Duration);

impl FromStr for DurationArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse(s).map(DurationArg)
    }
}

impl From<DurationArg> for Duration {
    fn from(d: DurationArg) -> Duration {
        d.0
    }
}

impl std::fmt::Display for DurationArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_number_is_seconds_and_units_are_read() {
        assert_eq!(parse("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn negative_empty_and_garbage_are_refused_naming_the_value() {
        for bad in [
            "-1",
            "-5m",
            "",
            "ten",
            "5 parsecs",
            "99999999999999999999999",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("number of seconds"), "{bad}: {e}");
            if !bad.is_empty() {
                assert!(e.contains(bad), "{bad}: {e}");
            }
        }
        assert!(parse("-1").unwrap_err().contains("negative"));
    }
}
