//! Generated from `proto/shop/order/v1/order.proto` by tonic-prost-build.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! `shop.order.v1`: messages, the `OrderService` and `OrderBranches`
    //! servers and clients.
    include!(concat!(env!("OUT_DIR"), "/shop.order.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the service (with imports), for gRPC
/// reflection and the REST face.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_order_v1.bin"));
