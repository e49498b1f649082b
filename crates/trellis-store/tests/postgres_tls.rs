//! PostgreSQL over TLS, chosen by the URL as libpq users expect
//! (`sslmode=verify-full&sslrootcert=…`): the connection is encrypted and
//! the server's certificate verified; a certificate from another authority
//! is refused.

#![cfg(feature = "postgres")]

use trellis_store::{Pool, migrator, with_pool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_in_the_url_encrypts_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ours =
        trellis_transport::certs::init(&dir.path().join("ours"), "trellis", &["postgres"]).unwrap();
    let theirs =
        trellis_transport::certs::init(&dir.path().join("theirs"), "trellis", &[]).unwrap();
    let (_, cert, key) = &ours.services[0];
    let pg = trellis_testkit::Postgres::start_tls(
        &std::fs::read_to_string(cert).unwrap(),
        &std::fs::read_to_string(key).unwrap(),
    )
    .unwrap();
    let migrations = migrator("_t_migrations", &[]);
    let url = |ca: &std::path::Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            ca.display()
        )
    };
    let pool = Pool::open(
        &url(&ours.ca),
        2,
        std::time::Duration::from_secs(5),
        &migrations,
    )
    .await
    .unwrap();
    let encrypted: bool = with_pool!(&pool, p => sqlx::query_scalar(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )
    .fetch_one(p)
    .await
    .unwrap());
    assert!(encrypted, "the session is not on TLS");
    pool.close().await;
    // Plaintext is still possible (the server allows both) — so the
    // refusal below is the certificate check's doing.
    Pool::open(&pg.url(), 1, std::time::Duration::from_secs(5), &migrations)
        .await
        .unwrap()
        .close()
        .await;
    let refused = Pool::open(
        &url(&theirs.ca),
        1,
        std::time::Duration::from_secs(5),
        &migrations,
    )
    .await;
    assert!(
        refused.is_err(),
        "a server certificate from another authority was accepted"
    );
}
