//! Generated from `proto/trellis/saga/v1/saga.proto` by tonic-prost-build.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    //! `trellis.saga.v1`: messages, the `SagaService` server and client.
    include!(concat!(env!("OUT_DIR"), "/trellis.saga.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the coordinator's API (with
/// imports), for reflection and its REST face.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trellis_saga_v1.bin"));
