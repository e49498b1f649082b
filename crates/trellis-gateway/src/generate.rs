//! Routes generated from services' protos: every `google.api.http`
//! binding becomes a route with its method and template, and every gRPC
//! service a prefix route for its methods (gRPC, and the JSON form of each
//! method at `POST /package.Service/Method`), all to the service as
//! discovered. `trellis up` puts the gateway in front of the shop this way.

use std::collections::BTreeMap;

use serde_json::Value;
use trellis_config::{BoxFuture, ConfigError, Layer, Source};
use trellis_transcode::Transcoder;

use crate::{
    GatewayError,
    config::{GatewayConfig, RouteConfig, UpstreamConfig},
};

/// The routes of `services` (full gRPC names, from `descriptor_sets`), to
/// the registry's service `upstream`. Route names are
/// `{upstream}.{Method}` (`.2`, `.3`… for additional bindings) and
/// `{upstream}.grpc.{Service}`.
pub fn routes_for(
    upstream: &str,
    descriptor_sets: &[&[u8]],
    services: &[&str],
) -> Result<GatewayConfig, GatewayError> {
    let transcoder = Transcoder::new(descriptor_sets, services)
        .map_err(|e| GatewayError::Config(format!("{upstream}: {e}")))?;
    let mut routes = BTreeMap::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for binding in transcoder.bindings() {
        let n = seen.entry(binding.rpc.name().to_owned()).or_insert(0);
        *n += 1;
        let name = if *n == 1 {
            format!("{upstream}.{}", binding.rpc.name())
        } else {
            format!("{upstream}.{}.{n}", binding.rpc.name())
        };
        routes.insert(
            name,
            RouteConfig {
                template: Some(binding.template.clone()),
                methods: vec![binding.method.to_string()],
                upstream: Some(upstream.to_owned()),
                ..RouteConfig::default()
            },
        );
    }
    for service in services {
        let short = service.rsplit('.').next().unwrap_or(service);
        routes.insert(
            format!("{upstream}.grpc.{short}"),
            RouteConfig {
                prefix: Some(format!("/{service}")),
                upstream: Some(upstream.to_owned()),
                ..RouteConfig::default()
            },
        );
    }
    let upstreams = [(
        upstream.to_owned(),
        UpstreamConfig {
            discover: Some(upstream.to_owned()),
            ..UpstreamConfig::default()
        },
    )]
    .into();
    Ok(GatewayConfig {
        upstreams,
        routes,
        ..GatewayConfig::default()
    })
}

/// A fixed document as a config source (it never changes), named `name`
/// in errors and in `/debug/config`'s provenance.
pub fn document_source(name: &str, document: &GatewayConfig) -> Result<impl Source, GatewayError> {
    let Value::Object(map) =
        serde_json::to_value(document).map_err(|e| GatewayError::Config(format!("{name}: {e}")))?
    else {
        return Err(GatewayError::Config(format!("{name}: not a document")));
    };
    Ok(Fixed(Some(Layer::new(name, map))))
}

struct Fixed(Option<Layer>);

impl Source for Fixed {
    fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
        let layers = self.0.clone().into_iter().collect();
        Box::pin(async move { Ok(layers) })
    }

    fn changed(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}
