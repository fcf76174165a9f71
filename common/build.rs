//! Compiles `proto/flotilla.proto` into Rust with prost, using protox (a protobuf compiler in
//! Rust) so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/flotilla.proto");
    let descriptors = protox::compile(["proto/flotilla.proto"], ["proto"])?;
    prost_build::Config::new()
        .btree_map(["."])
        // JSON views of inventory and samples for the admin API come from the same schema.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .compile_fds(descriptors)?;
    Ok(())
}
