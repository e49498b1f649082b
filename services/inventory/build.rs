//! Compiles the service's protos with protox (no protoc): see `trellis_build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    trellis_build::compile(
        &root,
        &["shop/inventory/v1/inventory.proto"],
        "shop_inventory_v1.bin",
    )
}
