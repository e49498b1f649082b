//! Generated from `proto/shop/payment/v1/payment.proto` by tonic-prost-build.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! `shop.payment.v1`: messages, the `PaymentService` and
    //! `PaymentBranches` servers and clients.
    include!(concat!(env!("OUT_DIR"), "/shop.payment.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the service (with imports), for gRPC
/// reflection and the REST face.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_payment_v1.bin"));
