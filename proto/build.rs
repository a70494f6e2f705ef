//! Generates the trove.v1 messages and services with a vendored `protoc`, so a
//! build needs nothing installed beyond the Rust toolchain.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds the compiler through this variable; setting it here
    // keeps any system protoc (of whatever version) out of the build.
    std::env::set_var("PROTOC", protoc);

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/trove/v1/objects.proto",
        "proto/trove/v1/artifacts.proto",
        "proto/trove/v1/entries.proto",
        "proto/trove/v1/cache.proto",
        "proto/trove/v1/admin.proto",
    ];
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".")
        .file_descriptor_set_path(out_dir.join("trove_v1_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
