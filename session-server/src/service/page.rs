//! ListByUser's pages: a user's sessions ordered by id, cut after `page_size` of them, each
//! page starting after the id its token names. The token is the base64url of the last id of
//! the page before: opaque to clients, and stateless, so any server of a deployment continues
//! any other's listing, and sessions made or deleted between two pages never make one show
//! twice.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::Status;

use crate::id;
use crate::store::SessionRecord;

/// Sessions in a page when the request asks for none (`page_size` 0).
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most sessions in one page: a larger `page_size` is taken as this, so one answer stays far
/// below the gRPC message limit even with large sessions.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The page size a request's `page_size` stands for.
pub(super) fn page_size(requested: u32) -> usize {
    match usize::try_from(requested) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(size) => size.min(MAX_PAGE_SIZE),
        Err(_) => MAX_PAGE_SIZE,
    }
}

/// The id a page token says to start after (`None` for the first page); INVALID_ARGUMENT for a
/// token this server did not make.
pub(super) fn start_after(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|after| id::is_valid(after))
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(
                "malformed page_token: pass back the next_page_token of an earlier answer",
            )
        })
}

/// The page of `records` (a user's sessions, in any order) that starts after the id `after`
/// and holds at most `size` sessions, ordered by id; and the token of the next page, empty
/// when this one is the last.
pub(super) fn page(
    mut records: Vec<SessionRecord>,
    after: Option<&str>,
    size: usize,
) -> (Vec<SessionRecord>, String) {
    if let Some(after) = after {
        records.retain(|record| record.id.as_str() > after);
    }
    records.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let more = records.len() > size;
    records.truncate(size);
    let next = match records.last() {
        Some(last) if more => URL_SAFE_NO_PAD.encode(&last.id),
        _ => String::new(),
    };
    (records, next)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn record(id: &str) -> SessionRecord {
        SessionRecord {
            id: id.to_owned(),
            namespace: "default".into(),
            user_id: "u".into(),
            attrs: Default::default(),
            version: 1,
            created_at: SystemTime::UNIX_EPOCH,
            expires_at: SystemTime::UNIX_EPOCH,
            ttl: Duration::from_secs(60),
        }
    }

    fn id(n: usize) -> String {
        format!("{n:0>32}")
    }

    #[test]
    fn pages_follow_each_other_in_id_order_to_an_empty_token() {
        let records: Vec<_> = [4, 0, 3, 1, 2].map(|n| record(&id(n))).into();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let (page, next) = page(records.clone(), after.as_deref(), 2);
            pages += 1;
            seen.extend(page.into_iter().map(|r| r.id));
            if next.is_empty() {
                break;
            }
            after = start_after(&next).expect("a token of ours");
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, (0..5).map(id).collect::<Vec<_>>());
    }

    #[test]
    fn an_exactly_full_last_page_has_no_next_token() {
        let records: Vec<_> = (0..2).map(|n| record(&id(n))).collect();
        let (page, next) = page(records, None, 2);
        assert_eq!(page.len(), 2);
        assert!(next.is_empty());
    }

    #[test]
    fn page_size_zero_is_the_default_and_large_ones_are_clamped() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(5000), MAX_PAGE_SIZE);
        assert_eq!(page_size(u32::MAX), MAX_PAGE_SIZE);
    }

    #[test]
    fn a_token_not_ours_is_invalid_argument() {
        let short = URL_SAFE_NO_PAD.encode("short");
        for bad in ["!!!", "a", short.as_str(), "AAAA====", "\u{e9}"] {
            let status = start_after(bad).expect_err(bad);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        }
        assert_eq!(start_after("").expect("first page"), None);
    }
}
