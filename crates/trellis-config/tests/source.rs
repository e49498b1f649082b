//! A source of one's own: it layers where the builder puts it, its changes
//! are followed, and a bad change is refused like a bad file edit.

mod support;

use std::{collections::BTreeMap, time::Duration};

use support::{Settings, eventually};
use tokio::sync::watch;
use trellis_config::{BoxFuture, Config, ConfigError, Layer, Source};

/// Key/value settings pushed through a channel, as a Consul KV watch
/// would deliver them.
struct Pushed {
    rx: watch::Receiver<BTreeMap<String, String>>,
}

impl Source for Pushed {
    fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
        let settings = self.rx.borrow_and_update().clone();
        Box::pin(async move { Ok(vec![Layer::from_settings("pushed kv", settings)]) })
    }

    fn changed(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.rx.changed().await.is_ok() })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_source_layers_above_env_and_is_followed() {
    let (tx, rx) = watch::channel(BTreeMap::from([("workers".to_owned(), "7".to_owned())]));
    let config = Config::<Settings>::builder()
        .env("APP")
        .env_vars([
            ("APP_WORKERS".to_owned(), "3".to_owned()),
            ("APP_NAME".to_owned(), "from-env".to_owned()),
        ])
        .set("flags", [("db.pool", "9")])
        .source(Pushed { rx })
        .build()
        .await
        .unwrap();
    let now = config.current();
    assert_eq!(now.config.workers, 7, "the source is above the environment");
    assert_eq!(now.config.name, "from-env", "the environment still counts");
    assert_eq!(now.config.db.pool, 9, "fixed settings apply");
    assert!(
        now.sources.iter().any(|(s, _)| s == "pushed kv"),
        "{:?}",
        now.sources
    );

    // A change is followed.
    tx.send_replace(BTreeMap::from([("workers".to_owned(), "11".to_owned())]));
    eventually(
        "workers = 11 from the source",
        Duration::from_secs(10),
        || config.current().config.workers == 11,
    )
    .await;

    // A bad change is refused, named by key and source; the last good stays.
    let version = config.current().version.clone();
    tx.send_replace(BTreeMap::from([("workers".to_owned(), "0".to_owned())]));
    eventually("the refusal to be counted", Duration::from_secs(10), || {
        config.reload_failures() == 1
    })
    .await;
    let error = config.last_error().unwrap();
    assert!(
        error.contains("workers") && error.contains("pushed kv"),
        "{error}"
    );
    assert_eq!(config.current().version, version);
    assert_eq!(config.current().config.workers, 11);

    // And a good one after it applies on top of the good layers.
    tx.send_replace(BTreeMap::from([("workers".to_owned(), "12".to_owned())]));
    eventually("workers = 12", Duration::from_secs(10), || {
        config.current().config.workers == 12
    })
    .await;
}

#[tokio::test]
async fn a_source_that_fails_at_start_fails_the_build() {
    struct Broken;
    impl Source for Broken {
        fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
            Box::pin(async {
                Err(ConfigError::Unavailable {
                    source_name: "broken kv".into(),
                    reason: "connection refused".into(),
                })
            })
        }
        fn changed(&mut self) -> BoxFuture<'_, bool> {
            Box::pin(async { false })
        }
    }
    let err = Config::<Settings>::builder()
        .source(Broken)
        .build()
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("broken kv"), "{err}");
}
