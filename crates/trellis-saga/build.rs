//! Compiles the coordinator's proto with protox (no protoc): see `trellis_build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    trellis_build::compile(
        &root,
        &["trellis/saga/v1/saga.proto"],
        "trellis_saga_v1.bin",
    )
}
