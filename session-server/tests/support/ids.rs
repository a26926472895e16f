//! Session ids for tests that call a store directly (through the server, the store makes them).

use std::sync::atomic::{AtomicU64, Ordering};

/// A well-formed 32-character id, unique within the test process.
pub fn new_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("id{:0>30}", NEXT.fetch_add(1, Ordering::Relaxed))
}
