//! A retry asks the pool for another endpoint than the one that failed
//! (`AvoidEndpoint`): it never gets it back while another is there, and
//! gets it when it is the only one.

use std::convert::Infallible;

use http::{Request, Response};
use tokio::sync::watch;
use tower::{BoxError, Service, ServiceExt, service_fn};
use trellis_balance::{AvoidEndpoint, BalanceConfig, Balanced, Policy};
use trellis_registry::{Instance, InstanceSet};

/// A pool whose endpoint services name themselves in `x-endpoint`.
fn pool(
    addresses: &[&str],
) -> Balanced<
    impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static,
> {
    let set: InstanceSet = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| Instance::new("svc", format!("i{i}")).with_endpoint("http", *a))
        .collect::<Vec<_>>()
        .into();
    let (_tx, rx) = watch::channel(set);
    let config = BalanceConfig {
        policy: Policy::RoundRobin,
        protocol: "http".into(),
        ..BalanceConfig::default()
    };
    Balanced::from_watch("svc", rx, config, |endpoint| {
        let address = endpoint.address().to_owned();
        Ok(service_fn(move |_req: Request<()>| {
            let address = address.clone();
            async move {
                let mut response = Response::new(String::new());
                response
                    .headers_mut()
                    .insert("x-endpoint", address.parse().expect("a header value"));
                Ok::<_, Infallible>(response)
            }
        }))
    })
}

async fn pick<S>(pool: &Balanced<S>, avoid: Option<&str>) -> String
where
    S: Service<Request<()>, Response = Response<String>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    let mut req = Request::new(());
    if let Some(a) = avoid {
        req.extensions_mut().insert(AvoidEndpoint(a.into()));
    }
    let response = pool.clone().oneshot(req).await.expect("a pick");
    response.headers()["x-endpoint"]
        .to_str()
        .expect("ASCII")
        .to_owned()
}

#[tokio::test]
async fn a_retry_never_goes_back_to_the_endpoint_it_avoids_while_another_is_there() {
    let three = pool(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
    // Without the hint round robin reaches every endpoint, the avoided one
    // included: the check below could fail.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(pick(&three, None).await);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for _ in 0..60 {
        assert_ne!(pick(&three, Some("10.0.0.2:80")).await, "10.0.0.2:80");
    }
    // The only endpoint is still used.
    let one = pool(&["10.0.0.9:80"]);
    assert_eq!(pick(&one, Some("10.0.0.9:80")).await, "10.0.0.9:80");
}
