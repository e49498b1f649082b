//! Generated from `proto/shop/inventory/v1/inventory.proto` by tonic-prost-build.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! `shop.inventory.v1`: messages, the `InventoryService` and
    //! `StockBranches` servers and clients.
    include!(concat!(env!("OUT_DIR"), "/shop.inventory.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the service (with imports), for gRPC
/// reflection and the REST face.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_inventory_v1.bin"));
