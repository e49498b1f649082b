//! Files as a config source: layering, and hot reload as real editors save.

mod support;

use std::{fs, io::Write, path::Path, time::Duration};

use support::{Settings, count_reloads, eventually, reloads};
use trellis_config::Config;

/// Longer than the debounce: anything still to come would have come.
/// Proves the watcher has handled every earlier event, without sleeping:
/// writes a last, distinct change and waits for it to apply. File events
/// reach the pipeline in order, so once the marker is in force nothing
/// written before it is still waiting to cause a reload.
async fn marker(file: &std::path::Path, config: &trellis_config::Config<support::Settings>) {
    fs::write(file, "workers = 42\n").unwrap();
    eventually("the marker change", Duration::from_secs(5), || {
        config.current().config.workers == 42
    })
    .await;
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn load(path: &Path, vars: &[(&str, &str)]) -> Config<Settings> {
    Config::<Settings>::builder()
        .file(path)
        .env("APP")
        .env_vars(env(vars))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_defaults_file_and_env_in_order_with_placeholders() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "name = \"${SERVICE_NAME:fallback}\"\nworkers = 2\n[db]\nurl = \"postgres://${DB_HOST}/shop\"\npool = \"${POOL:3}\"\n").unwrap();
    let config = load(&file, &[("DB_HOST", "db1"), ("APP_WORKERS", "6")]).await;
    let s = &config.current().config;
    assert_eq!(s.name, "fallback", "placeholder default");
    assert_eq!(
        s.db.url.expose(),
        "postgres://db1/shop",
        "placeholder from the environment"
    );
    assert_eq!(
        s.db.pool, 3,
        "a whole-string placeholder takes the number's type"
    );
    assert_eq!(s.workers, 6, "env overrides the file");
    assert_eq!(
        s.timeout,
        Duration::from_secs(5),
        "default where nobody set it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_is_read_in_name_order_skipping_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("10-base.yaml"), "name: base\nworkers: 2\n").unwrap();
    fs::write(dir.path().join("20-override.json"), r#"{"workers": 3}"#).unwrap();
    fs::write(dir.path().join(".20-override.json.swp"), "garbage").unwrap();
    fs::write(dir.path().join("notes.txt"), "not config").unwrap();
    let config = Config::<Settings>::builder()
        .file(dir.path())
        .build()
        .await
        .unwrap();
    assert_eq!(
        (
            config.current().config.name.as_str(),
            config.current().config.workers
        ),
        ("base", 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_config_fails_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = \"many\"\n").unwrap();
    let err = Config::<Settings>::builder()
        .file(&file)
        .build()
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("workers (from file ") && err.contains("app.toml"),
        "{err}"
    );

    fs::write(&file, "wrokers = 3\n").unwrap();
    let err = Config::<Settings>::builder()
        .file(&file)
        .build()
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("wrokers") && err.contains("unknown key"),
        "{err}"
    );

    fs::write(&file, "[db]\npool = 0\n").unwrap();
    let err = Config::<Settings>::builder()
        .file(&file)
        .build()
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("db.pool") && err.contains("between 1 and 100"),
        "{err}"
    );

    let err = Config::<Settings>::builder()
        .file(dir.path().join("missing.toml"))
        .build()
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("missing.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_env_variables_are_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n").unwrap();
    let config = load(&file, &[("APP_SOMETHING_ELSE", "x")]).await;
    assert_eq!(config.current().config.workers, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_rename_save_reloads_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n").unwrap();
    let config = load(&file, &[]).await;
    let count = count_reloads(config.subscribe());

    let tmp = dir.path().join("app.toml.tmp");
    fs::write(&tmp, "workers = 3\n").unwrap();
    fs::rename(&tmp, &file).unwrap();
    eventually("the reload", Duration::from_secs(5), || {
        config.current().config.workers == 3
    })
    .await;
    marker(&file, &config).await;
    assert_eq!(
        reloads(&count),
        2,
        "one reload for the save, one for the marker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_write_reloads_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n").unwrap();
    let config = load(&file, &[]).await;
    let count = count_reloads(config.subscribe());

    // Truncate, then write in two chunks: a reader in between would see a
    // partial file; the debounce must wait for the whole save.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .unwrap();
    f.write_all(b"workers = 3\n").unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    f.write_all(b"name = \"edited\"\n").unwrap();
    drop(f);
    eventually("the reload", Duration::from_secs(5), || {
        config.current().config.name == "edited"
    })
    .await;
    assert_eq!(config.current().config.workers, 3);
    marker(&file, &config).await;
    assert_eq!(
        reloads(&count),
        2,
        "one reload for the whole save (none for the half-written file), one for the marker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editors_swap_and_backup_dance_reloads_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n").unwrap();
    let config = load(&file, &[]).await;
    let count = count_reloads(config.subscribe());

    // What vim does on :w with backupcopy=no.
    let swap = dir.path().join(".app.toml.swp");
    fs::write(&swap, "swap").unwrap();
    fs::write(dir.path().join("4913"), "").unwrap();
    fs::remove_file(dir.path().join("4913")).unwrap();
    fs::rename(&file, dir.path().join("app.toml~")).unwrap();
    fs::write(&file, "workers = 5\n").unwrap();
    fs::remove_file(dir.path().join("app.toml~")).unwrap();
    fs::write(&swap, "swap again").unwrap();
    fs::remove_file(&swap).unwrap();

    eventually("the reload", Duration::from_secs(5), || {
        config.current().config.workers == 5
    })
    .await;
    marker(&file, &config).await;
    assert_eq!(
        reloads(&count),
        2,
        "one reload for the save, one for the marker"
    );
    assert_eq!(
        config.reload_failures(),
        0,
        "the moment the file was missing must not count as a failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_files_alone_cause_no_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n").unwrap();
    let config = load(&file, &[]).await;
    let count = count_reloads(config.subscribe());
    for name in [
        ".app.toml.swp",
        "app.toml~",
        "4913",
        "#app.toml#",
        "app.toml___jb_tmp___",
    ] {
        fs::write(dir.path().join(name), "workers = 99\n").unwrap();
    }
    // Touching the file without changing it is not a reload either.
    fs::write(&file, "workers = 2\n").unwrap();
    marker(&file, &config).await;
    assert_eq!(reloads(&count), 1, "only the marker reloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edit_is_rejected_and_the_last_good_config_stays() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n").unwrap();
    let config = load(&file, &[]).await;
    let good_version = config.current().version.clone();

    fs::write(&file, "workers = 0\n").unwrap();
    eventually("the rejection", Duration::from_secs(5), || {
        config.reload_failures() == 1
    })
    .await;
    let err = config.last_error().unwrap();
    assert!(
        err.contains("workers") && err.contains("app.toml") && err.contains("at least 1"),
        "{err}"
    );
    assert_eq!(config.current().config.workers, 2);
    assert_eq!(config.current().version, good_version);

    fs::write(&file, "workers = [\n").unwrap();
    eventually("the second rejection", Duration::from_secs(5), || {
        config.reload_failures() == 2
    })
    .await;
    assert!(
        config.last_error().unwrap().contains("cannot parse"),
        "{:?}",
        config.last_error()
    );

    fs::write(&file, "workers = 7\n").unwrap();
    eventually("the fix", Duration::from_secs(5), || {
        config.current().config.workers == 7
    })
    .await;
    assert_eq!(config.reload_failures(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sections_fire_only_when_they_change_and_secrets_stay_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.toml");
    fs::write(&file, "workers = 2\n[db]\nurl = \"postgres://u:pw@h/db\"\n").unwrap();
    let config = load(&file, &[]).await;
    let mut timeout = config.section(|s| s.timeout);
    timeout.borrow_and_update();

    fs::write(&file, "workers = 3\n[db]\nurl = \"postgres://u:pw@h/db\"\n").unwrap();
    eventually("workers", Duration::from_secs(5), || {
        config.current().config.workers == 3
    })
    .await;
    assert!(!timeout.has_changed().unwrap(), "timeout did not change");

    fs::write(
        &file,
        "workers = 3\ntimeout = \"250ms\"\n[db]\nurl = \"postgres://u:pw@h/db\"\n",
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), timeout.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*timeout.borrow(), Duration::from_millis(250));

    let view = config.debug_view();
    assert_eq!(view["config"]["db"]["url"], "[redacted]");
    assert_eq!(view["config"]["timeout"], "250ms");
    assert_eq!(view["config_reload_failures_total"], 0);
    assert!(!view.to_string().contains("pw@"), "{view}");
    assert_eq!(view["version"], serde_json::json!(config.current().version));
}
