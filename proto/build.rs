//! Compiles `proto/chat/v1/chat.proto` with prost and generates serde impls in the proto3 JSON
//! mapping with pbjson. protoc comes from the `protoc-bin-vendored` crate, so no system package
//! is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("chat_v1_descriptor.bin");
    println!("cargo:rerun-if-changed=proto/chat/v1/chat.proto");
    prost_build::Config::new()
        .file_descriptor_set_path(&descriptors)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&["proto/chat/v1/chat.proto"], &["proto"])?;
    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".chat.v1"])?;

    // The released schema, as descriptors only, for the compatibility test.
    println!("cargo:rerun-if-changed=compat/chat_v1_released.proto");
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg(format!(
            "--descriptor_set_out={}",
            out.join("chat_v1_released.bin").display()
        ))
        .args(["-I", "compat", "compat/chat_v1_released.proto"])
        .status()?;
    if !status.success() {
        return Err("protoc failed on compat/chat_v1_released.proto".into());
    }
    Ok(())
}
