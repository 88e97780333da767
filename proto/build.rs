use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so the build needs neither network nor a system package.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("packetcapture_v1_descriptor.bin"))
        .compile_protos(
            &[PathBuf::from("packetcapture/v1/agent.proto")],
            &[PathBuf::from("."), include],
        )?;
    println!("cargo:rerun-if-changed=packetcapture/v1/agent.proto");
    Ok(())
}
