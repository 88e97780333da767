//! UTC calendar arithmetic for file names and timestamps, without a
//! time-zone database (the agent works in UTC only).

/// Year, month, day, hour, minute, second of a Unix time in UTC.
pub fn utc(unix_secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400) as u32;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, secs / 3600, secs / 60 % 60, secs % 60)
}

/// `YYYYmmdd-HHMMSS`, as capture file names carry it.
pub fn file_stamp(unix_secs: i64) -> String {
    let (y, mo, d, h, mi, s) = utc(unix_secs);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// RFC 3339 with nanoseconds, `2026-11-26T05:03:31.123456789Z`.
pub fn write_rfc3339(out: &mut impl std::fmt::Write, unix_ns: u64) -> std::fmt::Result {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let (y, mo, d, h, mi, s) = utc(secs);
    write!(
        out,
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:09}Z",
        unix_ns % 1_000_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(file_stamp(1_701_441_022), "20231201-143022");
        // A leap day and the end of a century.
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(4_107_542_399), (2100, 2, 28, 23, 59, 59));
        let mut s = String::new();
        write_rfc3339(&mut s, 1_701_441_022_000_000_123).unwrap();
        assert_eq!(s, "2023-12-01T14:30:22.000000123Z");
    }
}
