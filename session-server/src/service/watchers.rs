//! The limit on Watch streams open at once on one namespace (`--max-watchers-per-namespace`):
//! each stream holds a [`WatcherGuard`] that counts it until the stream ends, whether the
//! server ends it (shutdown, a lagging watcher) or the client goes (cancel, lost connection:
//! tonic then drops the stream). Past the limit a Watch is RESOURCE_EXHAUSTED at once.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::IntGauge;
use tonic::Status;

use crate::metrics::Metrics;

/// Watch streams open per namespace, shared by every clone of the service.
#[derive(Debug)]
pub(super) struct Watchers {
    /// Most streams one namespace may have open.
    max_per_namespace: usize,
    /// Streams open by namespace; a namespace leaves the map when its last stream ends, so
    /// the map never holds more namespaces than have watchers.
    open: Mutex<HashMap<String, usize>>,
}

impl Watchers {
    /// At most `max_per_namespace` streams a namespace.
    pub(super) fn new(max_per_namespace: usize) -> Arc<Self> {
        Arc::new(Watchers {
            max_per_namespace,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more stream on `namespace`, counted in `metrics` until the guard is
    /// dropped; RESOURCE_EXHAUSTED (counted as a refusal) when the namespace has its most.
    pub(super) fn admit(
        self: &Arc<Self>,
        namespace: &str,
        metrics: &Metrics,
    ) -> Result<WatcherGuard, Status> {
        {
            let mut open = self.open.lock();
            if open.get(namespace).copied().unwrap_or(0) >= self.max_per_namespace {
                drop(open);
                metrics.watcher_refused();
                return Err(Status::resource_exhausted(format!(
                    "namespace {namespace:?} already has {} Watch streams open, the most the \
                     server allows (--max-watchers-per-namespace); end one first",
                    self.max_per_namespace
                )));
            }
            *open.entry(namespace.to_owned()).or_insert(0) += 1;
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
        if let Some(count) = open.get_mut(&self.namespace) {
            *count = count.saturating_sub(1);
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
        let watchers = Watchers::new(2);
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
        let watchers = Watchers::new(1);
        drop(watchers.admit("gone", &metrics).expect("admitted"));
        assert!(watchers.open.lock().is_empty());
    }
}
