//! One session's strings and data packed into a single allocation.
//!
//! A stored session costs one heap block for everything variable about it (namespace, id, owner,
//! attributes) instead of a `String` per name plus a hash table of attributes. Attributes are
//! decoded into the `HashMap` a [`SessionRecord`](crate::store::SessionRecord) carries only when
//! a record is produced. Layout (lengths are LEB128 varints, one byte below 128):
//!
//! ```text
//! flags: u8 | created_at seconds: u64 LE | created_at nanoseconds: u32 LE
//! len namespace | len id | len user_id | (len name | len value)*
//! ```
//!
//! Only this module writes the bytes, so they are always well formed; readers still never index
//! blindly, and a malformed field reads as empty rather than panicking.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Flag bit: the session was deleted and this is its tombstone (no owner, no attributes).
const DELETED: u8 = 1;
/// Flag bit: `created_at` is before the Unix epoch, so its seconds and nanoseconds count back.
const BEFORE_EPOCH: u8 = 2;
/// Length of the fixed header: flags, creation seconds (u64), creation nanoseconds (u32).
const HEAD_LEN: usize = 1 + 8 + 4;

/// Everything a packed session holds besides its attributes, borrowed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head<'a> {
    /// Namespace (already defaulted).
    pub(super) namespace: &'a str,
    /// Session id.
    pub(super) id: &'a str,
    /// Owner, or empty.
    pub(super) user_id: &'a str,
    /// First creation time (kept across regenerate).
    pub(super) created_at: SystemTime,
    /// Whether this is a tombstone.
    pub(super) deleted: bool,
}

/// A session's namespace, id, owner, creation time, tombstone flag and attributes, packed.
#[derive(Debug)]
pub(super) struct Packed(Box<[u8]>);

impl Packed {
    /// Packs `head` and `attrs` (name, value) into one exactly sized allocation. `attrs` is
    /// walked twice: once to size the block, once to fill it.
    pub(super) fn new<'a, I>(head: &Head<'_>, attrs: I) -> Self
    where
        I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    {
        let (before_epoch, secs, nanos) = split_time(head.created_at);
        let strings = [head.namespace, head.id, head.user_id].map(str::as_bytes);
        let len = HEAD_LEN
            + strings.iter().map(|s| field_len(s)).sum::<usize>()
            + attrs
                .clone()
                .map(|(name, value)| field_len(name) + field_len(value))
                .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        let mut flags = 0;
        if head.deleted {
            flags |= DELETED;
        }
        if before_epoch {
            flags |= BEFORE_EPOCH;
        }
        out.push(flags);
        out.extend_from_slice(&secs.to_le_bytes());
        out.extend_from_slice(&nanos.to_le_bytes());
        for string in strings {
            put_field(&mut out, string);
        }
        for (name, value) in attrs {
            put_field(&mut out, name);
            put_field(&mut out, value);
        }
        debug_assert_eq!(out.len(), len, "sized exactly");
        Self(out.into_boxed_slice())
    }

    /// Packs a new session from the attribute map the store API hands over.
    pub(super) fn from_map(head: &Head<'_>, attrs: &HashMap<String, Vec<u8>>) -> Self {
        Self::new(
            head,
            attrs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())),
        )
    }

    /// Everything but the attributes.
    pub(super) fn head(&self) -> Head<'_> {
        let mut fields = self.fields();
        let mut next = || text(fields.next().unwrap_or_default());
        let (namespace, id, user_id) = (next(), next(), next());
        Head {
            namespace,
            id,
            user_id,
            created_at: self.created_at(),
            deleted: self.is_deleted(),
        }
    }

    /// Owner and attributes, for a record or a patched copy. Namespace and id are skipped
    /// unread: the caller looked the session up by them, so it has them as `&str` already.
    pub(super) fn owner_and_attrs(&self) -> (&str, Attrs<'_>) {
        let mut fields = self.fields();
        // Skip namespace and id.
        fields.nth(1);
        let user_id = text(fields.next().unwrap_or_default());
        (user_id, Attrs(fields))
    }

    /// The same session as a tombstone: key and creation time kept, owner and data dropped.
    pub(super) fn tombstone(&self) -> Self {
        let head = Head {
            user_id: "",
            deleted: true,
            ..self.head()
        };
        Self::new(&head, std::iter::empty())
    }

    /// Whether this is a tombstone.
    pub(super) fn is_deleted(&self) -> bool {
        self.0.first().is_some_and(|flags| flags & DELETED != 0)
    }

    /// `(namespace, id)`, the session's key.
    pub(super) fn key(&self) -> (&[u8], &[u8]) {
        let mut fields = self.fields();
        (
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
        )
    }

    /// Whether this session is `id` in `namespace`.
    pub(super) fn is_key(&self, namespace: &str, id: &str) -> bool {
        let (ns, own_id) = self.key();
        own_id == id.as_bytes() && ns == namespace.as_bytes()
    }

    /// Owner, or empty.
    pub(super) fn user_id(&self) -> &str {
        self.owner_and_attrs().0
    }

    /// First creation time.
    pub(super) fn created_at(&self) -> SystemTime {
        let head = self.0.get(..HEAD_LEN).unwrap_or_default();
        let secs = head
            .get(1..9)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        let nanos = head
            .get(9..13)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes);
        let since = Duration::from_secs(secs).saturating_add(Duration::from_nanos(nanos.into()));
        let flags = head.first().copied().unwrap_or_default();
        let at = if flags & BEFORE_EPOCH != 0 {
            UNIX_EPOCH.checked_sub(since)
        } else {
            UNIX_EPOCH.checked_add(since)
        };
        at.unwrap_or(UNIX_EPOCH)
    }

    /// The attributes, as (name, value) byte strings.
    pub(super) fn attrs(&self) -> Attrs<'_> {
        let mut fields = self.fields();
        // Skip namespace, id and user.
        fields.nth(2);
        Attrs(fields)
    }

    /// The attributes as the map a record carries.
    #[cfg(test)]
    pub(super) fn attrs_map(&self) -> HashMap<String, Vec<u8>> {
        attrs_map(self.attrs())
    }

    /// [`attrs_size`](crate::store::attrs_size) of the attributes.
    #[cfg(test)]
    pub(super) fn size(&self) -> usize {
        self.attrs()
            .map(|(name, value)| crate::store::attr_size(name, value))
            .sum()
    }

    /// The namespace, id and user fields and then the attribute fields, in order.
    fn fields(&self) -> Fields<'_> {
        Fields(self.0.get(HEAD_LEN..).unwrap_or_default())
    }
}

/// The length-prefixed fields after the header.
#[derive(Debug, Clone)]
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        let (&first, mut rest) = self.0.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            long_len(first, &mut rest)?
        };
        let (field, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some(field)
    }
}

/// The rest of a varint length of 128 or more whose first byte was `first`.
#[inline]
fn long_len(first: u8, rest: &mut &[u8]) -> Option<usize> {
    let mut len = usize::from(first & 0x7f);
    let mut shift = 7u32;
    loop {
        let (&byte, tail) = rest.split_first()?;
        *rest = tail;
        len |= usize::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(len);
        }
        shift += 7;
    }
}

/// A packed session's attributes, as (name, value) byte strings.
#[derive(Debug, Clone)]
pub(super) struct Attrs<'a>(Fields<'a>);

impl<'a> Iterator for Attrs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        Some((self.0.next()?, self.0.next()?))
    }
}

/// Decodes attributes into the map a record carries.
pub(super) fn attrs_map(attrs: Attrs<'_>) -> HashMap<String, Vec<u8>> {
    let mut map = HashMap::with_capacity(attrs.clone().count());
    map.extend(attrs.map(|(name, value)| (text(name).to_owned(), value.to_vec())));
    map
}

/// Bytes that were a `&str` when packed, as `&str` again (empty if not UTF-8, which the packer
/// never produces).
pub(super) fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Encoded length of one field: its varint length prefix plus its bytes.
fn field_len(bytes: &[u8]) -> usize {
    let bits = usize::BITS - (bytes.len() | 1).leading_zeros();
    bits.div_ceil(7) as usize + bytes.len()
}

fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push((len & 0x7f) as u8 | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(bytes);
}

/// `(before the epoch, seconds, nanoseconds)` of a time, an exact encoding of any `SystemTime`.
fn split_time(at: SystemTime) -> (bool, u64, u32) {
    match at.duration_since(UNIX_EPOCH) {
        Ok(since) => (false, since.as_secs(), since.subsec_nanos()),
        Err(before) => {
            let before = before.duration();
            (true, before.as_secs(), before.subsec_nanos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head<'a>(id: &'a str, user: &'a str, created_at: SystemTime) -> Head<'a> {
        Head {
            namespace: "default",
            id,
            user_id: user,
            created_at,
            deleted: false,
        }
    }

    #[test]
    fn a_packed_session_reads_back_what_was_packed() {
        let created = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let attrs = HashMap::from([
            ("data".to_owned(), vec![7; 300]),
            (String::new(), Vec::new()),
            ("é".to_owned(), b"v".to_vec()),
        ]);
        let packed = Packed::from_map(&head("abc", "u", created), &attrs);
        assert_eq!(packed.key(), (&b"default"[..], &b"abc"[..]));
        assert!(packed.is_key("default", "abc"));
        assert!(!packed.is_key("default", "abd"));
        assert!(!packed.is_key("other", "abc"));
        assert_eq!(packed.user_id(), "u");
        assert_eq!(packed.created_at(), created);
        assert!(!packed.is_deleted());
        assert_eq!(packed.attrs_map(), attrs);
        assert_eq!(packed.size(), crate::store::attrs_size(&attrs));
        let head = packed.head();
        assert_eq!(
            (head.namespace, head.id, head.user_id),
            ("default", "abc", "u")
        );
        let (user, rest) = packed.owner_and_attrs();
        assert_eq!((user, rest.count()), ("u", 3));
    }

    #[test]
    fn long_and_non_ascii_strings_read_back() {
        let (id, user) = ("i".repeat(300), "é".repeat(100));
        let attrs = HashMap::from([("n".repeat(200), vec![1; 20_000])]);
        let packed = Packed::from_map(&head(&id, &user, UNIX_EPOCH), &attrs);
        let head = packed.head();
        assert_eq!(
            (head.namespace, head.id, head.user_id),
            ("default", &*id, &*user)
        );
        assert!(packed.is_key("default", &id));
        assert_eq!(packed.attrs_map(), attrs);
    }

    #[test]
    fn times_before_the_epoch_and_far_ahead_survive_packing() {
        for at in [
            UNIX_EPOCH - Duration::new(5, 1),
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(u64::from(u32::MAX) * 8, 999_999_999),
        ] {
            assert_eq!(
                Packed::new(&head("a", "", at), std::iter::empty()).created_at(),
                at
            );
        }
    }

    #[test]
    fn a_tombstone_keeps_key_and_creation_time_only() {
        let created = SystemTime::now();
        let attrs = HashMap::from([("k".to_owned(), b"v".to_vec())]);
        let tomb = Packed::from_map(&head("abc", "u", created), &attrs).tombstone();
        assert!(tomb.is_deleted());
        assert!(tomb.is_key("default", "abc"));
        assert_eq!(tomb.user_id(), "");
        assert_eq!(tomb.created_at(), created);
        assert_eq!(tomb.attrs().count(), 0);
    }

    #[test]
    fn malformed_bytes_read_as_empty_without_panicking() {
        for bytes in [
            &[][..],
            &[0; 5],
            &[0; 13],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff],
        ] {
            let packed = Packed(bytes.into());
            assert_eq!(packed.key(), (&[][..], &[][..]));
            assert_eq!(packed.attrs().count(), 0);
            let _ = (
                packed.created_at(),
                packed.user_id(),
                packed.head(),
                packed.attrs_map(),
            );
        }
    }
}
