//! Generated from `proto/shop/user/v1/user.proto` by tonic-prost-build.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! `shop.user.v1`: messages, the `UserService` server and client.
    include!(concat!(env!("OUT_DIR"), "/shop.user.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the service (with imports), for gRPC
/// reflection and, later, transcoding.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_user_v1.bin"));
