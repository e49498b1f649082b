//! Descriptors for a transcoding route fetched from its upstream's gRPC
//! server reflection (`grpc.reflection.v1`), instead of a descriptor set on
//! disk: the files that define the services, then every file they import,
//! asked for by name until none is missing. Bounded: at most [`MAX_FILES`]
//! files, [`MAX_BYTES`] in all, [`MAX_ROUNDS`] rounds, and a deadline.

use std::{collections::BTreeMap, time::Duration};

use prost::Message;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::upstream::GrpcCalls;

/// The most files read.
pub(crate) const MAX_FILES: usize = 1_000;
/// The most descriptor bytes read.
pub(crate) const MAX_BYTES: usize = 16 << 20;
/// The most import levels followed.
const MAX_ROUNDS: usize = 32;
/// The longest the whole fetch may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// A `FileDescriptorSet` (encoded) holding `services` and everything they
/// import, from the upstream behind `calls`.
pub(crate) async fn descriptor_set(
    calls: GrpcCalls,
    services: &[String],
) -> Result<Vec<u8>, String> {
    tokio::time::timeout(DEADLINE, fetch(calls, services))
        .await
        .map_err(|_| format!("server reflection did not answer within {DEADLINE:?}"))?
}

async fn fetch(calls: GrpcCalls, services: &[String]) -> Result<Vec<u8>, String> {
    let mut client = ServerReflectionClient::new(calls).max_decoding_message_size(MAX_BYTES);
    let mut files: BTreeMap<String, prost_types::FileDescriptorProto> = BTreeMap::new();
    let mut bytes = 0usize;
    let mut asks: Vec<MessageRequest> = services
        .iter()
        .map(|s| MessageRequest::FileContainingSymbol(s.clone()))
        .collect();
    for _ in 0..MAX_ROUNDS {
        if asks.is_empty() {
            let set = prost_types::FileDescriptorSet {
                file: files.into_values().collect(),
            };
            return Ok(set.encode_to_vec());
        }
        let requests: Vec<ServerReflectionRequest> = asks
            .drain(..)
            .map(|ask| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(ask),
            })
            .collect();
        let mut answers = client
            .server_reflection_info(futures_util::stream::iter(requests))
            .await
            .map_err(|s| format!("server reflection: {}", s.message()))?
            .into_inner();
        while let Some(answer) = answers
            .message()
            .await
            .map_err(|s| format!("server reflection: {}", s.message()))?
        {
            match answer.message_response {
                Some(MessageResponse::FileDescriptorResponse(found)) => {
                    for raw in found.file_descriptor_proto {
                        bytes += raw.len();
                        if bytes > MAX_BYTES || files.len() >= MAX_FILES {
                            return Err(format!(
                                "the upstream's descriptors are over {MAX_FILES} files or {MAX_BYTES} bytes"
                            ));
                        }
                        let file = prost_types::FileDescriptorProto::decode(raw.as_slice())
                            .map_err(|e| format!("a malformed file descriptor: {e}"))?;
                        files.insert(file.name().to_owned(), file);
                    }
                }
                Some(MessageResponse::ErrorResponse(e)) => {
                    return Err(format!("server reflection: {}", e.error_message));
                }
                _ => return Err("server reflection answered something else".to_owned()),
            }
        }
        // Imports not yet read, by name.
        let mut missing: Vec<String> = files
            .values()
            .flat_map(|f| f.dependency.iter())
            .filter(|d| !files.contains_key(*d))
            .cloned()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        asks = missing
            .into_iter()
            .map(MessageRequest::FileByFilename)
            .collect();
    }
    Err(format!("imports nested over {MAX_ROUNDS} levels"))
}
