//! Generated from `proto/shop/auth/v1/auth.proto` by tonic-prost-build.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! `shop.auth.v1`: messages, the `AuthService` server and client.
    include!(concat!(env!("OUT_DIR"), "/shop.auth.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the service (with imports), for gRPC
/// reflection and the REST face.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_auth_v1.bin"));
