//! etcd as the top config layer, against a real etcd.

mod support;

use std::time::{Duration, Instant};

use support::{Settings, eventually};
use trellis_config::Config;
use trellis_testkit::Etcd;

async fn load(etcd: &Etcd, file: Option<&std::path::Path>) -> Config<Settings> {
    let mut b = Config::<Settings>::builder()
        .etcd(vec![etcd.endpoint()], "/trellis/config/app/")
        .env_vars(Vec::new());
    if let Some(f) = file {
        b = b.file(f);
    }
    b.build().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_etcd_apply_and_override_files() {
    let etcd = Etcd::start().unwrap();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    kv.put("/trellis/config/app/workers", "3", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    std::fs::write(&file, "workers = 2\nname = \"from-file\"\n").unwrap();
    let config = load(&etcd, Some(&file)).await;
    assert_eq!(config.current().config.workers, 3, "etcd is above files");
    assert_eq!(config.current().config.name, "from-file");

    // Propagation: put -> applied in the running config.
    let mut samples = Vec::new();
    for i in 0..50u32 {
        let started = Instant::now();
        kv.put(
            "/trellis/config/app/timeout",
            format!("{}ms", 100 + i),
            None,
        )
        .await
        .unwrap();
        let want = Duration::from_millis(u64::from(100 + i));
        eventually("the new timeout", Duration::from_secs(5), || {
            config.current().config.timeout == want
        })
        .await;
        samples.push(started.elapsed());
    }
    samples.sort();
    eprintln!(
        "etcd put -> applied over {} changes: p50 {:?}, p99 {:?}",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100]
    );
    assert!(
        config
            .current()
            .sources
            .iter()
            .any(|(s, v)| s.starts_with("etcd") && v.is_some())
    );

    // Deleting the key falls back to the file.
    kv.delete("/trellis/config/app/workers", None)
        .await
        .unwrap();
    eventually("the file value", Duration::from_secs(5), || {
        config.current().config.workers == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_value_in_etcd_is_rejected_then_a_valid_one_applies() {
    let etcd = Etcd::start().unwrap();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let config = load(&etcd, None).await;
    assert_eq!(config.current().config.workers, 4);

    kv.put("/trellis/config/app/workers", "0", None)
        .await
        .unwrap();
    eventually("the rejection", Duration::from_secs(5), || {
        config.reload_failures() == 1
    })
    .await;
    let err = config.last_error().unwrap();
    assert!(
        err.contains("workers (from etcd /trellis/config/app/)"),
        "{err}"
    );
    assert_eq!(
        config.current().config.workers,
        4,
        "the last good config stays"
    );

    kv.put("/trellis/config/app/db/pool", "\"lots\"", None)
        .await
        .unwrap();
    eventually("the second rejection", Duration::from_secs(5), || {
        config.reload_failures() == 2
    })
    .await;
    assert!(
        config.last_error().unwrap().contains("db.pool"),
        "{:?}",
        config.last_error()
    );

    kv.put("/trellis/config/app/workers", "9", None)
        .await
        .unwrap();
    kv.put("/trellis/config/app/db/pool", "12", None)
        .await
        .unwrap();
    eventually("the valid value", Duration::from_secs(5), || {
        let c = config.current();
        c.config.workers == 9 && c.config.db.pool == 12
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_the_last_good_config_and_picks_up_changes_after() {
    let mut etcd = Etcd::start().unwrap();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    kv.put("/trellis/config/app/workers", "5", None)
        .await
        .unwrap();
    let config = load(&etcd, None).await;
    assert_eq!(config.current().config.workers, 5);

    etcd.stop();
    // Down for certain: its port refuses connections.
    assert!(
        tokio::net::TcpStream::connect(etcd.addr()).await.is_err(),
        "etcd still accepts connections after stop()"
    );
    assert_eq!(config.current().config.workers, 5);

    etcd.restart(false).unwrap();
    // A change made after the restart, by another client.
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    kv.put("/trellis/config/app/workers", "6", None)
        .await
        .unwrap();
    eventually(
        "the change made after the outage",
        Duration::from_secs(15),
        || config.current().config.workers == 6,
    )
    .await;
    assert_eq!(
        config.reload_failures(),
        0,
        "the outage counted as a bad config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_the_depth_limit_is_refused_at_start_and_live() {
    let etcd = Etcd::start().unwrap();
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    // Ten thousand levels: built into a document, dropping it would
    // overflow the stack of every service watching the prefix.
    let deep = format!("/trellis/config/app/{}", vec!["a"; 10_000].join("/"));

    // Live: rejected, named, counted; the last good config stays and the
    // next good change still applies.
    let config = load(&etcd, None).await;
    kv.put("/trellis/config/app/workers", "7", None)
        .await
        .unwrap();
    eventually("the good change", Duration::from_secs(5), || {
        config.current().config.workers == 7
    })
    .await;
    kv.put(deep.as_str(), "1", None).await.unwrap();
    eventually("the rejection", Duration::from_secs(5), || {
        config.reload_failures() == 1
    })
    .await;
    let err = config.last_error().unwrap();
    assert!(
        err.contains("a/a/a") && err.contains("10000 levels deep, over the limit of 32"),
        "{err}"
    );
    assert!(err.len() < 500, "the key is echoed bounded: {err}");
    assert_eq!(config.current().config.workers, 7);
    kv.delete(deep.as_str(), None).await.unwrap();
    kv.put("/trellis/config/app/workers", "8", None)
        .await
        .unwrap();
    eventually(
        "a good change after the bad key left",
        Duration::from_secs(5),
        || config.current().config.workers == 8,
    )
    .await;

    // At start: a clean error naming the key, not an abort.
    kv.put(deep.as_str(), "1", None).await.unwrap();
    let err = Config::<Settings>::builder()
        .etcd(vec![etcd.endpoint()], "/trellis/config/app/")
        .env_vars(Vec::new())
        .build()
        .await
        .err()
        .expect("a config with a 10 000-level key was loaded");
    assert!(err.to_string().contains("over the limit of 32"), "{err}");
}
