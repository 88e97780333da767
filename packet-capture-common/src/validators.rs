//! A capture file's validators (RFC 9110 8.8), which a download sends as
//! `ETag` and `Last-Modified`, and the conditions of a request that name
//! them: `If-Range`, to go on with the same file, and `If-None-Match` and
//! `If-Modified-Since`, to be told that a copy is still the file (304 Not
//! Modified). The agent answers them for its own downloads, the controller
//! for those it relays, with the validators of the agent's answer.

use std::time::SystemTime;

use httpdate::HttpDate;

/// A file's validators. A capture file does not change once it is there
/// (it is written under another name, then renamed), so both are strong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// A strong entity tag, quoted.
    pub etag: String,
    /// None for a time HTTP cannot write (before 1970, from 10000 on).
    pub modified: Option<HttpDate>,
}

/// 10000-01-01: HTTP dates have four digits of year.
pub const HTTP_DATES_END: u64 = 253_402_300_800;

/// `time` as an HTTP date, if one can say it (1970 to 9999): httpdate
/// panics on the others.
pub fn http_date(time: SystemTime) -> Option<HttpDate> {
    let since_epoch = time.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    (since_epoch.as_secs() < HTTP_DATES_END).then(|| time.into())
}

impl Validators {
    /// As a response's `ETag` and `Last-Modified` carry them; a date that
    /// does not parse is none.
    pub fn from_headers(etag: &str, last_modified: Option<&str>) -> Self {
        Self {
            etag: etag.trim().to_owned(),
            modified: last_modified.and_then(|d| d.trim().parse().ok()),
        }
    }

    /// The `Last-Modified` value.
    pub fn last_modified(&self) -> Option<String> {
        self.modified.map(|d| d.to_string())
    }

    /// Whether an `If-Range` value names this version: its ETag, compared
    /// strongly (a weak one never matches), or its Last-Modified date, to
    /// the second, in any of HTTP's date formats.
    pub fn is_named_by(&self, if_range: &str) -> bool {
        let value = if_range.trim();
        if value.starts_with('"') || value.starts_with("W/") {
            return value == self.etag;
        }
        self.modified
            .is_some_and(|modified| value.parse::<HttpDate>().ok() == Some(modified))
    }

    /// Whether a GET with these conditions is answered 304 Not Modified
    /// (RFC 9110 13.2.2, steps 3 and 4): `If-None-Match` names the file
    /// (`*`, or one of its tags by weak comparison); without one, an
    /// `If-Modified-Since` date is no earlier than the file's. A date that
    /// does not parse is ignored.
    pub fn not_modified(
        &self,
        if_none_match: Option<&str>,
        if_modified_since: Option<&str>,
    ) -> bool {
        let opaque = |tag: &str| tag.strip_prefix("W/").unwrap_or(tag).to_owned();
        if let Some(tags) = if_none_match {
            let ours = opaque(&self.etag);
            return tags
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || opaque(tag) == ours);
        }
        let since = if_modified_since.and_then(|d| d.trim().parse::<HttpDate>().ok());
        matches!((self.modified, since), (Some(modified), Some(since)) if modified <= since)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// Thu, 01 Jan 2026 00:00:00 GMT.
    fn midnight() -> Validators {
        Validators {
            etag: "\"a-96-1\"".into(),
            modified: Some((UNIX_EPOCH + Duration::from_secs(1_767_225_600)).into()),
        }
    }

    #[test]
    fn an_if_range_names_a_version_by_its_etag_or_its_date() {
        let version = midnight();
        assert_eq!(
            version.last_modified().as_deref(),
            Some("Thu, 01 Jan 2026 00:00:00 GMT")
        );
        for named in [
            "\"a-96-1\"",
            " \"a-96-1\" ",
            "Thu, 01 Jan 2026 00:00:00 GMT",
            "Thursday, 01-Jan-26 00:00:00 GMT",
            "Thu Jan  1 00:00:00 2026",
        ] {
            assert!(version.is_named_by(named), "{named}");
        }
        for other in [
            "W/\"a-96-1\"",
            "\"a-96-2\"",
            "a-96-1",
            "Thu, 01 Jan 2026 00:00:01 GMT",
            "2026-01-01T00:00:00Z",
            "",
        ] {
            assert!(!version.is_named_by(other), "{other}");
        }
        let undated = Validators {
            modified: None,
            ..version
        };
        assert!(!undated.is_named_by("Thu, 01 Jan 1970 00:00:00 GMT"));
    }

    #[test]
    fn a_copy_is_the_file_when_its_tag_or_a_later_date_says_so() {
        let file = midnight();
        let same = |inm, ims| file.not_modified(inm, ims);
        // If-None-Match: any tag of the list, weakly compared, or `*`.
        for tags in [
            "\"a-96-1\"",
            "W/\"a-96-1\"",
            "\"x\", \"a-96-1\"",
            " \"a-96-1\" ",
            "*",
        ] {
            assert!(same(Some(tags), None), "{tags}");
        }
        for tags in ["\"a-96-2\"", "a-96-1", "", "\"x\", W/\"y\""] {
            assert!(!same(Some(tags), None), "{tags}");
        }
        // If-Modified-Since: the file's date or later, in any format.
        for date in [
            "Thu, 01 Jan 2026 00:00:00 GMT",
            "Thu, 01 Jan 2026 00:00:01 GMT",
            "Thursday, 01-Jan-26 00:00:00 GMT",
            "Sat, 01 Jan 2050 00:00:00 GMT",
        ] {
            assert!(same(None, Some(date)), "{date}");
        }
        for date in ["Wed, 31 Dec 2025 23:59:59 GMT", "yesterday", ""] {
            assert!(!same(None, Some(date)), "{date}");
        }
        assert!(!same(None, None));
        // If-None-Match decides alone when it is there.
        assert!(!same(
            Some("\"other\""),
            Some("Thu, 01 Jan 2026 00:00:00 GMT")
        ));
        assert!(same(Some("\"a-96-1\""), Some("yesterday")));
        // A file with no date is never older than a date.
        let undated = Validators {
            modified: None,
            ..file.clone()
        };
        assert!(!undated.not_modified(None, Some("Sat, 01 Jan 2050 00:00:00 GMT")));
    }

    #[test]
    fn validators_read_back_from_their_headers() {
        let file = midnight();
        let read = Validators::from_headers(&file.etag, file.last_modified().as_deref());
        assert_eq!(read, file);
        let undated = Validators::from_headers("\"a\"", Some("not a date"));
        assert_eq!(undated.modified, None);
    }

    #[test]
    fn only_the_dates_http_can_write_are_dates() {
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(HTTP_DATES_END)),
            None
        );
        assert_eq!(http_date(UNIX_EPOCH - Duration::from_secs(1)), None);
        assert!(http_date(UNIX_EPOCH + Duration::from_secs(HTTP_DATES_END - 1)).is_some());
    }
}
