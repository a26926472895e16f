//! Examples of Stickless with other crates' APIs: see `examples/` (`cargo run -p
//! stickless-examples --example tower_sessions`). The library itself is empty.
