//! The conformance suite: the same test bodies, through the real gRPC server, for every store.
//!
//! Each body takes a [`Backend`] and lives in the module of its concern (`conformance/*.rs`);
//! the `conformance!` macro at the bottom instantiates every body once per store
//! (`memory::…`, `redis::…`, `redis_cluster::…`, `mysql::…`). A store whose service is missing
//! is skipped with a printed reason, or fails under `STICKLESS_REQUIRE_SERVICES=1`.

mod support;

#[path = "conformance/calls.rs"]
mod calls;
#[path = "conformance/cap.rs"]
mod cap;
#[path = "conformance/epochs.rs"]
mod epochs;
#[path = "conformance/expiry.rs"]
mod expiry;
#[path = "conformance/lifecycle.rs"]
mod lifecycle;
#[path = "conformance/lifetime.rs"]
mod lifetime;
#[path = "conformance/limits.rs"]
mod limits;
#[path = "conformance/restore.rs"]
mod restore;
#[path = "conformance/users.rs"]
mod users;
#[path = "conformance/watch.rs"]
mod watch;
#[path = "conformance/write_ids.rs"]
mod write_ids;
#[path = "conformance/writes.rs"]
mod writes;

use support::harness::Backend;

/// One test per body and store: `conformance!(module::body, …)` makes `memory::body`,
/// `redis::body`, `redis_near_cache::body` (Redis with a near cache), `redis_cluster::body` and
/// `mysql::body`.
macro_rules! conformance {
    ($($module:ident :: $name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::Redis).await;
                }
            )*
        }
        mod redis_near_cache {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::RedisNearCache).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::RedisCluster).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::Mysql).await;
                }
            )*
        }
    };
}

conformance!(
    lifecycle::create_get_delete,
    expiry::expiry_after_ttl,
    expiry::touch_slides_expiry,
    expiry::update_slides_expiry_and_can_change_ttl,
    expiry::max_ttl_is_clamped,
    lifecycle::regenerate_moves_data_and_kills_old_id,
    writes::attribute_patches_merge,
    writes::cas_conflict_is_aborted,
    users::user_index_lists_and_deletes_all,
    watch::watch_delivers_events_in_order,
    lifecycle::namespaces_are_isolated,
    limits::oversized_session_is_refused_and_nothing_stored,
    limits::malformed_input_is_invalid_argument,
    writes::cas_counter_reaches_exactly_1000,
    restore::restore_in_the_same_epoch_applies_offline_changes_once,
    restore::restore_never_undoes_a_change_the_store_made_since_the_base,
    restore::restore_in_the_same_epoch_never_brings_back_a_missing_session,
    restore::restore_input_is_checked,
    epochs::every_answer_carries_the_store_epoch,
    epochs::restore_of_another_epoch_recreates_an_absent_session_at_version_1,
    epochs::restore_of_a_deleted_session_is_refused_in_every_epoch,
    epochs::a_store_that_lost_its_data_has_a_new_epoch,
    cap::evict_oldest_keeps_the_newest_and_sends_deleted,
    cap::refuse_is_resource_exhausted_and_writes_nothing,
    cap::moving_a_session_to_a_user_at_the_cap_evicts_the_oldest,
    cap::restore_with_a_user_is_capped,
    cap::a_burst_of_creates_never_leaves_a_user_over_the_cap,
    cap::a_burst_under_refuse_admits_exactly_the_cap,
    write_ids::write_ids_are_kept_with_the_version_they_made,
    write_ids::restore_rebases_onto_its_own_write_whose_answer_was_lost,
    write_ids::restore_still_loses_to_another_writers_change,
    write_ids::an_unsure_write_is_the_base_only_right_after_it,
    write_ids::reserved_attributes_do_not_count_toward_the_size_limit,
    write_ids::restore_of_another_epoch_rebases_onto_its_own_recreation,
    lifetime::touched_session_ends_at_its_absolute_lifetime,
    lifetime::server_max_lifetime_caps_the_session_lifetime,
    lifetime::touches_inside_the_granularity_are_not_written,
    lifetime::a_touch_past_the_granularity_is_written,
);
