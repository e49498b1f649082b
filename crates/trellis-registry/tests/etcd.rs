//! The etcd backend against a real etcd from the testkit.

use std::time::{Duration, Instant};

use trellis_registry::{Discovery, EtcdOptions, EtcdRegistry, Instance, InstanceSet, Registry};
use trellis_testkit::Etcd;

async fn registry(etcd: &Etcd, ttl: Duration) -> EtcdRegistry {
    let mut options = EtcdOptions::new([etcd.endpoint()]);
    options.ttl = ttl;
    EtcdRegistry::connect(options).await.unwrap()
}

fn ids(set: &InstanceSet) -> Vec<String> {
    let mut ids: Vec<String> = set.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    ids
}

async fn wait_until(
    rx: &mut tokio::sync::watch::Receiver<InstanceSet>,
    within: Duration,
    what: &str,
    f: impl FnMut(&InstanceSet) -> bool,
) {
    let done = tokio::time::timeout(within, rx.wait_for(f))
        .await
        .map(|r| r.map(drop));
    match done {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the watch ended while waiting for {what}"),
        Err(_) => panic!(
            "timed out waiting for {what}; last set {:?}",
            ids(&rx.borrow())
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_reach_watchers_and_deregistrations_leave_at_once() {
    let etcd = Etcd::start().unwrap();
    let registry = registry(&etcd, Duration::from_secs(5)).await;
    let mut users = registry.watch("user").await.unwrap();
    assert!(users.borrow().is_empty());

    // Latency from register() to the watcher seeing the instance.
    let mut samples = Vec::new();
    let mut registrations = Vec::new();
    for i in 0..100 {
        let started = Instant::now();
        let reg = registry
            .register(
                Instance::new("user", format!("u{i:03}"))
                    .with_endpoint("grpc", format!("127.0.0.1:{}", 9000 + i)),
            )
            .await
            .unwrap();
        let want = format!("u{i:03}");
        wait_until(&mut users, Duration::from_secs(5), "registration", |s| {
            s.iter().any(|x| x.id == want)
        })
        .await;
        samples.push(started.elapsed());
        registrations.push(reg);
    }
    samples.sort();
    eprintln!(
        "register->visible over {} registrations: p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        samples[samples.len() - 1]
    );
    assert_eq!(users.borrow().len(), 100);
    let listed = registry.list(Some("user")).await.unwrap();
    assert_eq!(listed.len(), 100);
    assert!(
        listed
            .iter()
            .all(|l| l.ttl_left.is_some_and(|t| t <= Duration::from_secs(5))),
        "{listed:?}"
    );

    // Deregistration is visible well before any TTL could expire.
    let started = Instant::now();
    registrations.remove(0).deregister().await.unwrap();
    wait_until(&mut users, Duration::from_secs(2), "deregistration", |s| {
        !s.iter().any(|x| x.id == "u000")
    })
    .await;
    eprintln!("deregister->gone: {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_keep_the_last_set_while_etcd_is_down_and_resume_after() {
    let mut etcd = Etcd::start().unwrap();
    let registry = registry(&etcd, Duration::from_secs(5)).await;
    let mut users = registry.watch("user").await.unwrap();
    let _a = registry.register(Instance::new("user", "a")).await.unwrap();
    wait_until(&mut users, Duration::from_secs(5), "a", |s| s.len() == 1).await;

    etcd.stop();
    // An outage that lasts (real time is the point here: the mirror goes
    // through failed resumes meanwhile) must not empty the set.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ids(&users.borrow()),
        ["a"],
        "the last known set must survive an outage"
    );

    etcd.restart(false).unwrap();
    let _b = registry.register(Instance::new("user", "b")).await.unwrap();
    wait_until(
        &mut users,
        Duration::from_secs(10),
        "a and b after the restart",
        |s| s.len() == 2,
    )
    .await;
    assert_eq!(ids(&users.borrow()), ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_register_again_after_etcd_loses_its_data() {
    let mut etcd = Etcd::start().unwrap();
    let registry = registry(&etcd, Duration::from_secs(2)).await;
    let _a = registry
        .register(Instance::new("user", "a").with_endpoint("grpc", "127.0.0.1:1"))
        .await
        .unwrap();

    etcd.restart(true).unwrap();
    // A fresh cluster knows nothing; the session must notice and write again.
    let observer = registry_fresh(&etcd).await;
    let mut users = observer.watch("user").await.unwrap();
    wait_until(
        &mut users,
        Duration::from_secs(15),
        "re-registration",
        |s| ids(s) == ["a"],
    )
    .await;
    assert_eq!(users.borrow()[0].endpoint("grpc"), Some("127.0.0.1:1"));
}

async fn registry_fresh(etcd: &Etcd) -> EtcdRegistry {
    registry(etcd, Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_are_not_instances_are_ignored() {
    let etcd = Etcd::start().unwrap();
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    raw.put("/trellis/services/user/garbage", "{not json", None)
        .await
        .unwrap();
    let registry = registry(&etcd, Duration::from_secs(5)).await;
    let mut users = registry.watch("user").await.unwrap();
    assert!(users.borrow().is_empty());
    raw.put("/trellis/services/user/garbage2", "[]", None)
        .await
        .unwrap();
    // Records a peer could write to make every client allocate without
    // bound: a weight of 2^32-1 (ring points), a huge record, too many
    // metadata entries. The same record with a sane weight is accepted,
    // so the rejection is the limit's doing.
    let record = |weight: u32| {
        serde_json::to_string(&Instance::new("user", "w").with_weight(100))
            .unwrap()
            .replace("\"weight\":100", &format!("\"weight\":{weight}"))
    };
    raw.put("/trellis/services/user/w", record(u32::MAX), None)
        .await
        .unwrap();
    let mut big = Instance::new("user", "big");
    big.metadata.insert("blob".into(), "x".repeat(20_000));
    raw.put(
        "/trellis/services/user/big",
        serde_json::to_string(&big).unwrap(),
        None,
    )
    .await
    .unwrap();
    let mut crowded = Instance::new("user", "crowded");
    for i in 0..100 {
        crowded.metadata.insert(format!("k{i}"), "v".into());
    }
    raw.put(
        "/trellis/services/user/crowded",
        serde_json::to_string(&crowded).unwrap(),
        None,
    )
    .await
    .unwrap();
    let _a = registry.register(Instance::new("user", "a")).await.unwrap();
    wait_until(&mut users, Duration::from_secs(5), "a", |s| ids(s) == ["a"]).await;
    assert_eq!(registry.list(None).await.unwrap().len(), 1);

    raw.put("/trellis/services/user/w", record(10_000), None)
        .await
        .unwrap();
    wait_until(&mut users, Duration::from_secs(5), "a and w", |s| {
        ids(s) == ["a", "w"]
    })
    .await;
    assert_eq!(users.borrow()[1].weight, 10_000);

    // Nor can one be published.
    let err = registry
        .register(Instance::new("user", "heavy").with_weight(u32::MAX))
        .await
        .err()
        .expect("an out-of-range weight was published");
    assert!(err.to_string().contains("weight"), "{err}");
}

/// `etcd://HOST:PORT?ca_file=…&cert_file=…&key_file=…`: the registry on an
/// etcd that requires client certificates, over TLS; the same URL without
/// the client certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_speaks_mutual_tls_to_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let certs = trellis_transport::certs::init(dir.path(), "trellis", &["etcd", "user"]).unwrap();
    let (_, cert, key) = &certs.services[0];
    let etcd = Etcd::start_tls(cert, key, &certs.ca).unwrap();
    let (_, client_cert, client_key) = &certs.services[1];
    let url = format!(
        "etcd://{}?ca_file={}&cert_file={}&key_file={}",
        etcd.tls_addr().unwrap(),
        certs.ca.display(),
        client_cert.display(),
        client_key.display()
    );
    let registry = trellis_registry::connect(&url).await.unwrap();
    let mut users = registry.watch("user").await.unwrap();
    let _reg = registry
        .register(Instance::new("user", "u1").with_endpoint("grpc", "127.0.0.1:9000"))
        .await
        .unwrap();
    wait_until(
        &mut users,
        Duration::from_secs(10),
        "registration over TLS",
        |s| s.iter().any(|x| x.id == "u1"),
    )
    .await;

    // Only the CA, no client certificate: etcd refuses.
    let bare = format!(
        "etcd://{}?ca_file={}",
        etcd.tls_addr().unwrap(),
        certs.ca.display()
    );
    let refused = match trellis_registry::connect(&bare).await {
        Err(_) => true,
        Ok(r) => r.watch("user").await.is_err(),
    };
    assert!(refused, "etcd served a client without a certificate");
}
