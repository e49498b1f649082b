//! The response stage of a unary call: the gRPC answer (status in the
//! headers or the trailers, one framed message) as JSON, or the error.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};
use prost_reflect::{DynamicMessage, ReflectMessage, SerializeOptions};
use tower::BoxError;
use trellis_core::{Error, protocol::GRPC_STATUS};

use crate::{Body, TranscodeOptions, framing::FrameDecoder, json::Plans, service::Route};

/// The JSON answer to a unary call.
pub(crate) async fn unary<B>(
    options: &TranscodeOptions,
    plans: &Plans,
    route: &Route,
    response: Response<B>,
) -> Result<Response<Body>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    check_status(&parts.headers)?;
    let collected = http_body_util::BodyExt::collect(body).await.map_err(|e| {
        let e: BoxError = e.into();
        Error::unavailable(format!("the gRPC response broke off: {e}"))
    })?;
    if let Some(trailers) = collected.trailers() {
        check_status(trailers)?;
    } else if parts.headers.get(GRPC_STATUS).is_none() {
        return Err(Error::internal("the gRPC response ended without a status"));
    }
    // The answer was produced by a service within its own limits; what
    // matters here is that a peer cannot make the transcoder buffer more
    // than one response.
    let mut frames = FrameDecoder::new(usize::MAX);
    frames.push(&collected.to_bytes());
    let message = frames
        .next_message()?
        .ok_or_else(|| Error::internal("the gRPC response carried no message"))?;
    let json = message_json(options, plans, route, &message)?;
    let mut answer = Response::new(crate::full(Bytes::from(json)));
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(answer)
}

/// A response message's wire bytes as JSON: written straight from the wire
/// when it can be ([`crate::json`]), else decoded and serialized.
pub(crate) fn message_json(
    options: &TranscodeOptions,
    plans: &Plans,
    route: &Route,
    message: &[u8],
) -> Result<Vec<u8>, Error> {
    if options.emit_defaults && route.response_body.is_none() {
        let mut out = Vec::with_capacity(plans.capacity(route.output_plan, message));
        if plans.write(route.output_plan, message, &mut out).is_ok() {
            return Ok(out);
        }
    }
    let output = DynamicMessage::decode(route.rpc.output(), message)
        .map_err(|e| Error::internal(e.to_string()))?;
    to_json(options, route, &output)
}

/// A response message as JSON (one field of it, with `response_body`).
pub(crate) fn to_json(
    options: &TranscodeOptions,
    route: &Route,
    output: &DynamicMessage,
) -> Result<Vec<u8>, Error> {
    let serialize = SerializeOptions::new().skip_default_fields(!options.emit_defaults);
    if let Some(field) = &route.response_body {
        // One field: serialize a message with only that field, then take
        // the field's JSON out of it.
        let mut only = DynamicMessage::new(output.descriptor());
        only.set_field(field, output.get_field(field).into_owned());
        let full = only
            .serialize_with_options(
                serde_json::value::Serializer,
                &serialize.clone().skip_default_fields(false),
            )
            .map_err(|e| Error::internal(e.to_string()))?;
        let part = full
            .get(field.json_name())
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        return serde_json::to_vec(&part).map_err(|e| Error::internal(e.to_string()));
    }
    let mut out = serde_json::Serializer::new(Vec::with_capacity(128));
    output
        .serialize_with_options(&mut out, &serialize)
        .map_err(|e| Error::internal(e.to_string()))?;
    Ok(out.into_inner())
}

/// A gRPC status in these headers, as an error (`Ok` for OK or none).
pub(crate) fn check_status(headers: &HeaderMap) -> Result<(), Error> {
    match headers.get(GRPC_STATUS) {
        None => Ok(()),
        Some(v) if v == "0" => Ok(()),
        Some(_) => Err(tonic::Status::from_header_map(headers)
            .map(Error::from)
            .unwrap_or_else(|| Error::internal("an unreadable gRPC status"))),
    }
}

/// An error as the JSON body of the error model.
pub(crate) fn error_json(e: &Error) -> Vec<u8> {
    serde_json::to_vec(&e.to_body()).unwrap_or_else(|_| b"{}".to_vec())
}
