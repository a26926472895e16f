//! The limits on Watch streams open at once on one namespace (`--max-watchers-per-namespace`)
//! and over all namespaces (`--max-watchers`, so that many namespaces cannot get round the
//! first): each stream holds a [`WatcherGuard`] that counts it until the stream ends, whether the
//! server ends it (shutdown, a lagging watcher) or the client goes (cancel, lost connection:
//! tonic then drops the stream). Past the limit a Watch is RESOURCE_EXHAUSTED at once.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::IntGauge;
use tonic::Status;

use crate::metrics::Metrics;

/// Watch streams open per namespace and in all, shared by every clone of the service.
#[derive(Debug)]
pub(super) struct Watchers {
    /// Most streams one namespace may have open.
    max_per_namespace: usize,
    /// Most streams open over all namespaces.
    max_total: usize,
    /// Streams open by namespace; a namespace leaves the map when its last stream ends, so
    /// the map never holds more namespaces than have watchers.
    open: Mutex<HashMap<String, usize>>,
    /// Streams open over all namespaces (the sum of `open`), under the same lock.
    total: Mutex<usize>,
}

impl Watchers {
    /// At most `max_per_namespace` streams a namespace and `max_total` in all.
    pub(super) fn new(max_per_namespace: usize, max_total: usize) -> Arc<Self> {
        Arc::new(Watchers {
            max_per_namespace,
            max_total,
            open: Mutex::new(HashMap::new()),
            total: Mutex::new(0),
        })
    }

    /// A place for one more stream on `namespace`, counted in `metrics` until the guard is
    /// dropped; RESOURCE_EXHAUSTED (counted as a refusal) when the namespace, or the server
    /// as a whole, has its most.
    pub(super) fn admit(
        self: &Arc<Self>,
        namespace: &str,
        metrics: &Metrics,
    ) -> Result<WatcherGuard, Status> {
        {
            // Always `open` first, then `total`.
            let mut open = self.open.lock();
            let mut total = self.total.lock();
            if *total >= self.max_total {
                drop(total);
                drop(open);
                metrics.watcher_refused();
                return Err(Status::resource_exhausted(format!(
                    "the server already has {} Watch streams open, the most it allows \
                     (--max-watchers); end one first",
                    self.max_total
                )));
            }
            if open.get(namespace).copied().unwrap_or(0) >= self.max_per_namespace {
                drop(total);
                drop(open);
                metrics.watcher_refused();
                return Err(Status::resource_exhausted(format!(
                    "namespace {namespace:?} already has {} Watch streams open, the most the \
                     server allows (--max-watchers-per-namespace); end one first",
                    self.max_per_namespace
                )));
            }
            *open.entry(namespace.to_owned()).or_insert(0) += 1;
            *total += 1;
        }
        let gauge = metrics.watchers_gauge().clone();
        gauge.inc();
        Ok(WatcherGuard {
            watchers: self.clone(),
            namespace: namespace.to_owned(),
            gauge,
        })
    }

    /// Streams open on `namespace` now.
    #[cfg(test)]
    fn open(&self, namespace: &str) -> usize {
        self.open.lock().get(namespace).copied().unwrap_or(0)
    }
}

/// One open Watch stream's place under the limit, given back when dropped.
#[derive(Debug)]
pub(super) struct WatcherGuard {
    /// The counts it is in.
    watchers: Arc<Watchers>,
    /// The namespace it counts against.
    namespace: String,
    /// `stickless_watchers`, moved up when the guard was made.
    gauge: IntGauge,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        let mut open = self.watchers.open.lock();
        let mut total = self.watchers.total.lock();
        if let Some(count) = open.get_mut(&self.namespace) {
            *count = count.saturating_sub(1);
            *total = total.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.namespace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_gets_its_most_and_each_end_makes_room() {
        let metrics = Metrics::new();
        let watchers = Watchers::new(2, 10);
        let first = watchers.admit("a", &metrics).expect("first");
        let _second = watchers.admit("a", &metrics).expect("second");
        let refused = watchers.admit("a", &metrics).expect_err("a third");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(metrics.watchers_refused(), 1);
        let _other = watchers
            .admit("b", &metrics)
            .expect("another namespace has its own count");
        assert_eq!(metrics.watchers(), 3);
        drop(first);
        assert_eq!(watchers.open("a"), 1);
        assert_eq!(metrics.watchers(), 2);
        let _again = watchers.admit("a", &metrics).expect("room again");
    }

    #[test]
    fn a_namespace_without_watchers_leaves_the_map() {
        let metrics = Metrics::new();
        let watchers = Watchers::new(1, 10);
        drop(watchers.admit("gone", &metrics).expect("admitted"));
        assert!(watchers.open.lock().is_empty());
        assert_eq!(*watchers.total.lock(), 0);
    }

    #[test]
    fn many_namespaces_do_not_get_round_the_overall_limit() {
        let metrics = Metrics::new();
        let watchers = Watchers::new(5, 2);
        let first = watchers.admit("a", &metrics).expect("first");
        let _second = watchers.admit("b", &metrics).expect("second");
        let refused = watchers
            .admit("c", &metrics)
            .expect_err("a third, anywhere");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-watchers"), "{refused:?}");
        assert_eq!(metrics.watchers_refused(), 1);
        drop(first);
        let _again = watchers.admit("c", &metrics).expect("room again");
        assert_eq!(metrics.watchers(), 2);
    }
}
