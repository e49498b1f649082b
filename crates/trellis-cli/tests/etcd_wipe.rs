//! etcd loses its data (wiped and restarted on the same address) under a
//! running service and a running discovery client: both follow the new
//! cluster without being restarted.

mod support;

use std::time::{Duration, Instant};

use trellis::registry::{Discovery, EtcdOptions, EtcdRegistry, Instance};
use trellis_testkit::{Etcd, http};

async fn request_timeout(admin: std::net::SocketAddr) -> serde_json::Value {
    let res = http::get(admin, "/debug/config").await.unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    let view: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    view["config"]["server"]["request_timeout"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_config_follow_an_etcd_that_lost_its_data() {
    let mut etcd = Etcd::start().unwrap();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    kv.put("/trellis/config/user/server/request_timeout", "30s", None)
        .await
        .unwrap();
    // History the wiped cluster will not reach again before the new puts.
    for i in 0..30 {
        kv.put(format!("/filler/{i}"), "x", None).await.unwrap();
    }

    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap());
    let admin: std::net::SocketAddr =
        format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
            .parse()
            .unwrap();
    let mut server = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &listen,
        "--admin-listen",
        &admin.to_string(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--registry",
        &format!("etcd://{}", etcd.addr()),
        "--config-source",
        &format!("etcd://{}/trellis/config", etcd.addr()),
    ]);
    server.line_starting_with("user serving");
    assert_eq!(request_timeout(admin).await, "30s");

    let discovery = EtcdRegistry::connect(EtcdOptions::new([etcd.endpoint()]))
        .await
        .unwrap();
    let mut users = discovery.watch("user").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), users.wait_for(|s| s.len() == 1))
        .await
        .expect("the served instance never showed up")
        .unwrap();

    etcd.restart(true).unwrap();
    let wiped_at = Instant::now();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let extra =
        serde_json::to_string(&Instance::new("user", "extra").with_endpoint("grpc", "127.0.0.1:1"))
            .unwrap();
    kv.put("/trellis/services/user/extra", extra, None)
        .await
        .unwrap();
    let put = kv
        .put("/trellis/config/user/server/request_timeout", "5s", None)
        .await
        .unwrap();
    let revision = put.header().map(|h| h.revision()).unwrap_or_default();
    assert!(
        revision < 30,
        "the new cluster is at revision {revision}, past the old history"
    );

    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        users.wait_for(|s| s.iter().any(|i| i.id == "extra")),
    )
    .await
    .is_ok();
    let instances: Vec<String> = users.borrow().iter().map(|i| i.id.clone()).collect();
    assert!(
        seen,
        "the discovery client did not see the new instance within 5 s; it holds {instances:?}"
    );

    let deadline = wiped_at + Duration::from_secs(5);
    loop {
        let value = request_timeout(admin).await;
        if value == "5s" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service did not apply the new value within 5 s of the wipe; it has {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "both followed the wiped cluster {:?} after the restart",
        wiped_at.elapsed()
    );
}
