//! Generates the CSI gRPC code from proto/csi.proto.
//!
//! protox parses the proto in pure Rust (google/protobuf/wrappers.proto is built in),
//! so no system protoc is needed and nothing is downloaded. tonic-prost-build then
//! writes `csi.v1.rs` (messages, server traits and clients) into `OUT_DIR`, included
//! from Rust with `tonic::include_proto!("csi.v1")`.

use std::error::Error;

const PROTO: &str = "proto/csi.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
