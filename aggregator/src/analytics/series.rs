//! Hourly series on a regular grid: the one input shape every forecaster and score here takes.
//!
//! Invariants:
//! - A [`HourlySeries`] has one slot per hour from `start_ms` (a whole UTC hour) on; a slot is
//!   `None` where no value exists (a gap), never a made-up zero.
//! - Several values that fall into one hour (duplicate timestamps, or minute points) are averaged.
//! - Non-finite values are dropped on the way in, so every stored value is finite.
//! - Filling gaps (linear interpolation) is a separate, explicit step ([`HourlySeries::filled`])
//!   used only to fit models; scores are computed on existing values only.
//!
//! Also here: UTC calendar helpers (no clock is read) and the CSV reader of
//! `flotilla forecast backtest --csv`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One hour, ms.
pub const HOUR_MS: i64 = 3_600_000;
/// One day, ms.
pub const DAY_MS: i64 = 86_400_000;

/// Why a series could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    /// A CSV line is not `timestamp,value`.
    #[error("line {line}: {reason}: {text:?}")]
    Csv {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
        /// The line.
        text: String,
    },
    /// The input has no usable value.
    #[error("the series has no values")]
    Empty,
    /// The timestamps span more hours than a series holds.
    #[error(
        "the timestamps span {hours} hours (line {first_line} to line {last_line}), more than \
         the {MAX_SLOTS} hours (20 years) a series holds; check for a stray timestamp"
    )]
    TooLong {
        /// Hours from the earliest to the latest timestamp.
        hours: i64,
        /// 1-based line of the earliest timestamp.
        first_line: usize,
        /// 1-based line of the latest timestamp.
        last_line: usize,
    },
}

/// The most hourly slots a series holds (20 years): older points are left out of a grid, so one
/// stray timestamp cannot make it allocate terabytes.
pub const MAX_SLOTS: usize = 24 * 366 * 20;

/// Values on an hourly grid; `None` marks a missing hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HourlySeries {
    /// Start of the first slot, Unix ms (a whole hour).
    pub start_ms: i64,
    /// One slot per hour.
    pub values: Vec<Option<f64>>,
}

// === impl HourlySeries ===

impl HourlySeries {
    /// Puts `(unix_ms, value)` points on the hourly grid: each point goes into the hour that
    /// holds it, several points in one hour are averaged, hours without points are `None`.
    pub fn from_points(points: impl IntoIterator<Item = (i64, f64)>) -> Self {
        let mut acc: BTreeMap<i64, (f64, u32)> = BTreeMap::new();
        for (t, v) in points {
            if v.is_finite() {
                let e = acc.entry(floor_hour(t)).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
        let (Some(first), Some(last)) =
            (acc.keys().next().copied(), acc.keys().next_back().copied())
        else {
            return Self { start_ms: 0, values: Vec::new() };
        };
        // At most MAX_SLOTS hours, ending with the last point; older points are left out.
        let max_span = (MAX_SLOTS as i64 - 1) * HOUR_MS;
        let first = first.max(last.saturating_sub(max_span));
        let len = usize::try_from(last.saturating_sub(first) / HOUR_MS + 1).unwrap_or(0);
        let mut values = vec![None; len.min(MAX_SLOTS)];
        for (t, (sum, n)) in acc.range(first..) {
            if let Some(slot) =
                usize::try_from((t - first) / HOUR_MS).ok().and_then(|i| values.get_mut(i))
            {
                *slot = Some(sum / f64::from(*n));
            }
        }
        Self { start_ms: first, values }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when there are no slots.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Slots that hold a value.
    pub fn present(&self) -> usize {
        self.values.iter().filter(|v| v.is_some()).count()
    }

    /// Start of slot `i`, Unix ms.
    pub fn time_of(&self, i: usize) -> i64 {
        self.start_ms + i64::try_from(i).unwrap_or(i64::MAX / HOUR_MS) * HOUR_MS
    }

    /// End of the grid (start of the slot after the last), Unix ms.
    pub fn end_ms(&self) -> i64 {
        self.time_of(self.len())
    }

    /// The slot holding `unix_ms`, clamped to `0..=len`.
    pub fn index_at(&self, unix_ms: i64) -> usize {
        let i = (floor_hour(unix_ms) - self.start_ms) / HOUR_MS;
        usize::try_from(i.max(0)).unwrap_or(0).min(self.len())
    }

    /// The slots before `unix_ms`.
    pub fn before(&self, unix_ms: i64) -> Self {
        let end = self.index_at(unix_ms);
        Self { start_ms: self.start_ms, values: self.values[..end].to_vec() }
    }

    /// The last `hours` slots (all of them when there are fewer).
    pub fn last(&self, hours: usize) -> Self {
        let from = self.len().saturating_sub(hours);
        Self { start_ms: self.time_of(from), values: self.values[from..].to_vec() }
    }

    /// The same series without its leading and trailing missing slots.
    pub fn trimmed(&self) -> Self {
        let first = self.values.iter().position(Option::is_some).unwrap_or(self.len());
        let last = self.values.iter().rposition(Option::is_some).map_or(first, |i| i + 1);
        Self { start_ms: self.time_of(first), values: self.values[first..last].to_vec() }
    }

    /// Gaps filled by linear interpolation between the neighbouring values (ends carry the
    /// nearest value); empty when there is no value at all.
    pub fn filled(&self) -> Vec<f64> {
        let known: Vec<(usize, f64)> =
            self.values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).collect();
        let (Some(&(first_i, first_v)), Some(&(last_i, last_v))) = (known.first(), known.last())
        else {
            return Vec::new();
        };
        let mut out = vec![0.0; self.len()];
        out[..=first_i].fill(first_v);
        out[last_i..].fill(last_v);
        for w in known.windows(2) {
            let ((a, va), (b, vb)) = (w[0], w[1]);
            for (k, slot) in out.iter_mut().enumerate().take(b + 1).skip(a) {
                *slot = va + (vb - va) * (k - a) as f64 / (b - a) as f64;
            }
        }
        out
    }
}

/// The start of the UTC hour holding `unix_ms`.
pub fn floor_hour(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month, day)` of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Start of the UTC day holding `unix_ms`.
pub fn day_start(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(DAY_MS) * DAY_MS
}

/// Start of the UTC month holding `unix_ms`, and of the next one.
pub fn month_bounds(unix_ms: i64) -> (i64, i64) {
    let (y, m, _) = civil_from_days(unix_ms.div_euclid(DAY_MS));
    let start = days_from_civil(y, m, 1) * DAY_MS;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, days_from_civil(ny, nm, 1) * DAY_MS)
}

/// Parses `YYYY-MM-DDTHH[:MM[:SS[.fff]]]` (`T` or a space) followed by nothing (UTC), `Z`, or
/// a UTC offset `+HH:MM`, `+HHMM` or `+HH` (or `-`), which is honoured; or a Unix time in seconds
/// (up to 11 digits) or milliseconds. Anything else after the time (an unknown zone name, stray
/// text) is refused rather than ignored, so a local time is never read as UTC by accident.
pub fn parse_time(text: &str) -> Option<i64> {
    let t = text.trim();
    let digits = t.strip_suffix('Z').unwrap_or(t);
    if digits.bytes().all(|b| b.is_ascii_digit()) && !digits.is_empty() {
        let n: i64 = digits.parse().ok()?;
        return Some(if digits.len() <= 11 { n.checked_mul(1000)? } else { n });
    }
    let b = t.as_bytes();
    if b.len() < 13 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        t.get(r)
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse::<u32>().ok())
    };
    let year = i64::from(num(0..4)?);
    let (month, day, hour) = (num(5..7)?, num(8..10)?, num(11..13)?);
    let mut at = 13;
    let field = |at: &mut usize| {
        if b.get(*at) == Some(&b':') {
            let v = num(*at + 1..*at + 3)?;
            *at += 3;
            Some(v)
        } else {
            Some(0)
        }
    };
    let minute = field(&mut at)?;
    let second = if at == 16 { field(&mut at)? } else { 0 };
    let mut millis = 0i64;
    if at == 19 && b.get(at) == Some(&b'.') {
        let frac: String = t[at + 1..].chars().take_while(char::is_ascii_digit).collect();
        if frac.is_empty() {
            return None;
        }
        let ms3: String = frac.chars().chain(std::iter::repeat('0')).take(3).collect();
        millis = ms3.parse().ok()?;
        at += 1 + frac.len();
    }
    let offset_min = parse_offset(&t[at..])?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(hour) * 3600
        + i64::from(minute) * 60
        + i64::from(second.min(60))
        - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// The zone suffix of a date-time: empty or `Z` is UTC (0), `+HH:MM` / `+HHMM` / `+HH` (or `-`)
/// is that offset in minutes east of UTC; anything else is `None`.
fn parse_offset(zone: &str) -> Option<i64> {
    if zone.is_empty() || zone == "Z" {
        return Some(0);
    }
    let sign = match zone.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let rest = zone[1..].replace(':', "");
    if !rest.bytes().all(|c| c.is_ascii_digit()) || !(rest.len() == 2 || rest.len() == 4) {
        return None;
    }
    let hours: i64 = rest[..2].parse().ok()?;
    let minutes: i64 = if rest.len() == 4 { rest[2..].parse().ok()? } else { 0 };
    if hours > 23 || minutes > 59 || zone[1..].matches(':').count() > 1 {
        return None;
    }
    Some(sign * (hours * 60 + minutes))
}

/// Formats Unix ms as `YYYY-MM-DDTHH:MM` UTC.
pub fn format_time(unix_ms: i64) -> String {
    let (y, m, d) = civil_from_days(unix_ms.div_euclid(DAY_MS));
    let rem = unix_ms.rem_euclid(DAY_MS) / 60_000;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}", rem / 60, rem % 60)
}

/// Reads `timestamp,value` lines (a header line is skipped when its value does not parse as a
/// number) into points.
pub fn parse_csv(text: &str) -> Result<Vec<(i64, f64)>, SeriesError> {
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason| SeriesError::Csv { line: n + 1, reason, text: line.to_owned() };
        let (t, v) = line.split_once(',').ok_or_else(|| err("expected timestamp,value"))?;
        let value = match v.trim().parse::<f64>() {
            Ok(v) => v,
            Err(_) if n == 0 => continue,
            Err(_) => return Err(err("the value is not a number")),
        };
        let unix_ms = parse_time(t).ok_or_else(|| err(
            "the timestamp is not a date-time (YYYY-MM-DDTHH:MM:SS, then nothing, Z or a UTC offset \
             like +02:00) or Unix seconds/milliseconds",
        ))?;
        out.push((unix_ms, value));
        lines.push(n + 1);
    }
    let (Some(earliest), Some(latest)) = (
        out.iter().enumerate().min_by_key(|(_, (t, _))| *t),
        out.iter().enumerate().max_by_key(|(_, (t, _))| *t),
    ) else {
        return Err(SeriesError::Empty);
    };
    let hours = latest.1.0.saturating_sub(earliest.1.0) / HOUR_MS;
    if hours >= MAX_SLOTS as i64 {
        return Err(SeriesError::TooLong {
            hours,
            first_line: lines[earliest.0],
            last_line: lines[latest.0],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_averages_duplicates_and_keeps_gaps() {
        let s = HourlySeries::from_points([
            (HOUR_MS * 10, 1.0),
            (HOUR_MS * 10 + 5, 3.0),
            (HOUR_MS * 13, 8.0),
            (HOUR_MS * 11, f64::NAN),
        ]);
        assert_eq!(s.start_ms, HOUR_MS * 10);
        assert_eq!(s.values, vec![Some(2.0), None, None, Some(8.0)]);
        assert_eq!(s.filled(), vec![2.0, 4.0, 6.0, 8.0]);
        assert_eq!(s.present(), 2);
        assert_eq!(s.before(HOUR_MS * 12).values, vec![Some(2.0), None]);
        assert_eq!(s.last(1).start_ms, HOUR_MS * 13);
    }

    #[test]
    fn a_stray_timestamp_is_refused_not_gridded_into_terabytes() {
        // Regression: one Unix-ms timestamp in the year 292 million made `from_points` ask for
        // trillions of slots and abort the CLI.
        let text = "time,value\n2024-01-01T00:00,5\n9223372036854775807,6\n";
        let err = parse_csv(text).unwrap_err().to_string();
        assert!(err.contains("line 2 to line 3") && err.contains("stray timestamp"), "{err}");
        let grid =
            HourlySeries::from_points([(0, 1.0), (i64::MAX, 2.0), (i64::MAX - HOUR_MS, 3.0)]);
        assert_eq!(grid.len(), MAX_SLOTS, "the grid keeps the most recent 20 years");
        assert_eq!(grid.values.last(), Some(&Some(2.0)));
        assert_eq!(grid.values[MAX_SLOTS - 2], Some(3.0));
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(days_from_civil(2018, 9, 10)), (2018, 9, 10));
        assert_eq!(parse_time("2018-09-10T00:00:00"), Some(days_from_civil(2018, 9, 10) * DAY_MS));
        assert_eq!(
            parse_time("2018-09-10 05:00Z"),
            Some(days_from_civil(2018, 9, 10) * DAY_MS + 5 * HOUR_MS)
        );
        assert_eq!(parse_time("1700000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2018-13-01T00"), None);
        assert_eq!(
            format_time(days_from_civil(2024, 2, 29) * DAY_MS + HOUR_MS),
            "2024-02-29T01:00"
        );
        let (a, b) = month_bounds(days_from_civil(2024, 12, 15) * DAY_MS);
        assert_eq!(
            (a, b),
            (days_from_civil(2024, 12, 1) * DAY_MS, days_from_civil(2025, 1, 1) * DAY_MS)
        );
    }

    #[test]
    fn csv_reads_header_and_names_bad_lines() {
        let pts =
            parse_csv("timestamp,value\n2018-01-01T00:00:00,5\n2018-01-01T01:00:00,6\n").unwrap();
        assert_eq!(pts.len(), 2);
        let err = parse_csv("timestamp,value\n2018-01-01T00,x\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_csv("timestamp,value\n").is_err());
    }

    #[test]
    fn utc_offsets_are_honoured_and_unknown_zones_refused() {
        let utc = days_from_civil(2018, 9, 10) * DAY_MS + 5 * HOUR_MS;
        assert_eq!(parse_time("2018-09-10T07:00:00+02:00"), Some(utc));
        assert_eq!(parse_time("2018-09-10T07:00+0200"), Some(utc));
        assert_eq!(parse_time("2018-09-10T07+02"), Some(utc));
        assert_eq!(parse_time("2018-09-10T01:30:00-03:30"), Some(utc));
        assert_eq!(parse_time("2018-09-10T05:00:00.250Z"), Some(utc + 250));
        assert_eq!(parse_time("2018-09-10T05:00:00.5+00:00"), Some(utc + 500));
        assert_eq!(parse_time("2018-09-10T05:00:00 CEST"), None);
        assert_eq!(parse_time("2018-09-10T05:00:00+2"), None);
        assert_eq!(parse_time("2018-09-10T05:00:00junk"), None);
        assert_eq!(parse_time("2018-09-10T05:0"), None);
        let pts = parse_csv("timestamp,value\n2018-09-10T07:00:00+02:00,5\n").unwrap();
        assert_eq!(pts, vec![(utc, 5.0)]);
        let err = parse_csv("t,v\n2018-09-10T07:00:00 PST,5\n").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("UTC offset"), "{err}");
    }
}
