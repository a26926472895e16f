//! Compiles `session.proto` with protox (a protobuf compiler in Rust, so nothing needs installing
//! by hand) and generates the tonic client and server, plus the encoded descriptor set that the
//! session server hands to gRPC reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=session.proto");
    let fds = protox::compile(["session.proto"], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("session_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A snapshot cookie's body encodes the same way on every issue.
        .btree_map(".session.v1.Snapshot.attrs")
        .compile_fds(fds)?;
    Ok(())
}
