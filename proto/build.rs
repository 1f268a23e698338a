//! Generate the tonic/prost code for `farm.proto` with the vendored `protoc` (no system
//! protoc needed), plus a file descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=farm.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    // An explicit PROTOC (e.g. Debian's /usr/bin/protoc) wins; otherwise the vendored one.
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // `Workers.Connect` would clash with the generated `WorkersClient::connect(dst)`
        // constructor, so no client gets that convenience: build a `Channel` (with the
        // TLS, timeouts and interceptors the caller wants) and pass it to `new`.
        .build_transport(false)
        .file_descriptor_set_path(out.join("farm_descriptor.bin"))
        .bytes(".farm.v1.UploadChunk.data")
        .bytes(".farm.v1.ReadChunk.data")
        .compile_with_config(config, &["farm.proto"], &["."])?;
    Ok(())
}
