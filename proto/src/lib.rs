//! The Stickless gRPC API, `session.v1`, generated from `session.proto` once for every crate.
//!
//! Servers implement [`v1::session_store_server::SessionStore`]; clients use
//! [`v1::session_store_client::SessionStoreClient`]. [`FILE_DESCRIPTOR_SET`] is the encoded
//! descriptor set of the API (with the well-known types it imports), for gRPC server reflection.
//!
//! ```
//! use session_proto::v1::GetRequest;
//! let req = GetRequest { namespace: "shop".into(), id: "x".repeat(32), touch: true, ..Default::default() };
//! assert!(req.touch);
//! ```

/// Messages, client and server of the `session.v1` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("session.v1");
}

/// The encoded `FileDescriptorSet` of `session.proto` and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/session_descriptor.bin"));

/// The fully qualified name of the gRPC service, as it appears in health checks and reflection.
pub const SERVICE_NAME: &str = "session.v1.SessionStore";
