//! Staleness between session servers on one store (issue 16, "measure staleness honestly"):
//! two servers on one Redis, each with its own store instance (as two processes would have),
//! writes through one and reads through the other. Without a cache in either, every read
//! shows the caller's acknowledged write: no stale read, so a cache that is turned on later is
//! judged against zero. `load-grpc --staleness` is the same measure at scale.

// Shared with fallback_safety.rs, which uses all of it.
#[allow(dead_code)]
#[path = "support/stores.rs"]
mod stores;
mod support;

use std::time::Duration;

use bench::staleness::{StalenessSettings, run};
use stores::{Kind, Server, StoreSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_another_server_on_one_redis_see_every_acknowledged_write() {
    let test = "reads_through_another_server_on_one_redis_see_every_acknowledged_write";
    let Some(spec) = StoreSpec::open(Kind::Redis, test).await else {
        return;
    };
    let writer = Server::start(spec.build().await, spec.settings()).await;
    let reader = Server::start(spec.build().await, spec.settings()).await;
    for touch in [true, false] {
        let report = run(&StalenessSettings {
            writer: format!("http://{}", writer.addr),
            reader: format!("http://{}", reader.addr),
            sessions: 8,
            trials: 2_000,
            touch,
            catch_up_within: Duration::from_secs(5),
        })
        .await
        .expect("a staleness run");
        assert_eq!(report.trials, 2_000, "{report}");
        assert_eq!(report.errors, 0, "{report}");
        assert_eq!(
            (report.stale_reads, report.never_caught_up),
            (0, 0),
            "touch {touch}: {report}"
        );
    }
    writer.stop().await;
    reader.stop().await;
}
