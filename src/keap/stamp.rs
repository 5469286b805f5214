//! Keap's update stamps: a contact's `last_updated` (v1), a hook's `object_keys[].timestamp`
//! and v2's `update_time`, read as microseconds since the Unix epoch so that they compare
//! with each other and with `keap_sync.mirror.updated_at`.
//!
//! Only a full RFC 3339 time with an offset is read (`2024-08-14T12:34:56.789Z`, Keap's v1
//! examples; `+00:00`, `+0000` and `+00` offsets too, and a space for the `T`); anything else
//! is no stamp (`None`), never an error and never a guess: a stamp decides only that a read
//! may be skipped, and no stamp means the read happens.

/// `text` as microseconds since 1970-01-01T00:00:00Z; `None` unless it is a full RFC 3339
/// time with an offset. Digits of a second beyond the sixth are dropped.
pub(crate) fn micros(text: &str) -> Option<i64> {
    let b = text.trim().as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let at = |i: usize, want: &[u8]| b.get(i).is_some_and(|c| want.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut i = 19;
    let mut fraction = 0;
    if at(i, b".") {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let kept = digits.min(6);
        fraction = num(i + 1, kept)? * 10_i64.pow(u32::try_from(6 - kept).ok()?);
        i += 1 + digits;
    }
    let offset_secs = offset(&b[i..])?;
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_secs;
    Some(secs * 1_000_000 + fraction)
}

/// The SQL of a `timestamptz` from microseconds since the epoch (`expr`, a `bigint`; null
/// stays null), exactly: no floating point between.
pub(crate) fn sql(expr: &str) -> String {
    format!("(timestamptz 'epoch' + {expr} * interval '1 microsecond')")
}

/// The offset east of UTC in seconds: `Z`, `±HH:MM`, `±HHMM` or `±HH`, and nothing after.
fn offset(b: &[u8]) -> Option<i64> {
    match b {
        [b'Z' | b'z'] => Some(0),
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let digits: Vec<u8> = match rest {
                [h1, h2] => vec![*h1, *h2, b'0', b'0'],
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => vec![*h1, *h2, *m1, *m2],
                _ => return None,
            };
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n = |i: usize| i64::from(digits[i] - b'0');
            let (hours, minutes) = (n(0) * 10 + n(1), n(2) * 10 + n(3));
            if hours > 23 || minutes > 59 {
                return None;
            }
            let secs = hours * 3_600 + minutes * 60;
            Some(if *sign == b'-' { -secs } else { secs })
        }
        _ => None,
    }
}

fn days_in(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keaps_stamps_read_as_microseconds_since_the_epoch() {
        assert_eq!(micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(micros("1970-01-01T00:00:00.000001Z"), Some(1));
        assert_eq!(micros("2024-08-14T12:34:56.789Z"), Some(1_723_638_896_789_000));
        // The same instant in every accepted spelling.
        for same in [
            "2024-08-14T14:34:56.789+02:00",
            "2024-08-14T14:34:56.789+0200",
            "2024-08-14T14:34:56.789+02",
            "2024-08-14 12:34:56.789z",
            "2024-08-14T08:34:56.789-04:00",
            " 2024-08-14T12:34:56.789000000Z ",
            "2024-08-14T12:34:56.7890009Z",
        ] {
            assert_eq!(micros(same), Some(1_723_638_896_789_000), "{same}");
        }
        assert_eq!(micros("2024-08-14T12:34:56.7891Z"), Some(1_723_638_896_789_100));
        assert_eq!(micros("2024-02-29T00:00:00Z"), Some(1_709_164_800_000_000));
        assert_eq!(micros("1969-12-31T23:59:59Z"), Some(-1_000_000));
    }

    #[test]
    fn anything_but_a_full_time_with_an_offset_is_no_stamp() {
        for bad in [
            "",
            "x",
            "now",
            "2024-08-14",
            "2024-08-14T12:34:56",
            "2024-08-14T12:34:56.789",
            "2024-08-14T12:34:56.Z",
            "2024-08-14T12:34:56.789Zjunk",
            "2024-08-14T12:34:56+2",
            "2024-08-14T24:00:00Z",
            "2024-08-14T12:60:00Z",
            "2024-08-14T12:34:60Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-00-01T00:00:00Z",
            "2024-08-14T12:34:56+24:00",
            "2024-8-14T12:34:56Z",
            "+2024-08-14T12:34:56Z",
            "1723638896789",
        ] {
            assert_eq!(micros(bad), None, "{bad:?}");
        }
    }
}
