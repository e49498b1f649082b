//! Compiles the service's protos with protox (no protoc): see `trellis_build`.
//! The saga coordinator's messages come from `trellis_saga`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    trellis_build::compile_with(
        &root,
        &["shop/order/v1/order.proto"],
        "shop_order_v1.bin",
        &[(".trellis.saga.v1", "::trellis_saga::api::v1")],
    )
}
