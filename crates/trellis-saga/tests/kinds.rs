//! TCC and two-phase messages end to end: the coordinator as a Trellis
//! service (its gRPC API, the Rust client), participants over HTTP with
//! their handlers behind the barrier, on SQLite and on PostgreSQL.
//!
//! - TCC: two accounts frozen by Try, spent by Confirm when both Tries
//!   succeeded, released by Cancel when one was refused.
//! - Messages: a local transaction and a guaranteed credit — submitted
//!   after commit; never submitted but committed (checked back: runs);
//!   never committed (checked back: aborted, and the late local
//!   transaction is refused by the barrier).

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use tokio::sync::oneshot;
use trellis::{App, State as Lifecycle, config::Config, transport::ServerConfig};
use trellis_saga::{
    api::v1::{GetSagaRequest, Saga as SagaView, Status, saga_service_client::SagaServiceClient},
    barrier::{self, BarrierError, Branch, Outcome, Skip},
    client::Saga,
    log::Endpoint,
    service::{Coordinator, SagaSettings},
};
use trellis_store::{Pool, with_pool, with_tx};

/// `holds(account, available, frozen, spent)`: what TCC moves.
async fn participant(url: &str) -> (SocketAddr, Pool) {
    let migrations = trellis_store::migrator(
        "_bank_migrations",
        &[
            (
                1,
                "bank",
                "CREATE TABLE holds (account TEXT PRIMARY KEY, available BIGINT NOT NULL, frozen BIGINT NOT NULL, spent BIGINT NOT NULL);
                 INSERT INTO holds VALUES ('a', 100, 0, 0);
                 INSERT INTO holds VALUES ('b', 5, 0, 0);
                 CREATE TABLE local_orders (id TEXT PRIMARY KEY);",
            ),
            barrier::MIGRATION,
        ],
    );
    let pool = Pool::open(url, 4, Duration::from_secs(10), &migrations)
        .await
        .unwrap();
    // Each route: one UPDATE of `holds` for the account and amount in the
    // body ("a:10"), under the barrier; 409 when the row would go below 0.
    async fn op(pool: &Pool, headers: &HeaderMap, body: String, sql: &'static str) -> StatusCode {
        let Ok(branch) = Branch::from_headers(headers) else {
            return StatusCode::BAD_REQUEST;
        };
        let Some((account, amount)) = body
            .split_once(':')
            .and_then(|(a, n)| Some((a.to_owned(), n.parse::<i64>().ok()?)))
        else {
            return StatusCode::BAD_REQUEST;
        };
        let outcome = barrier::run(pool, &branch, |tx| {
            Box::pin(async move {
                let changed = with_tx!(tx, c => sqlx::query(sql)
                    .bind(amount)
                    .bind(&account)
                    .execute(&mut **c)
                    .await
                    .map(|r| r.rows_affected()))
                .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
                if changed == 1 {
                    Ok(())
                } else {
                    Err(StatusCode::CONFLICT)
                }
            })
        })
        .await;
        match outcome {
            Ok(_) => StatusCode::OK,
            Err(BarrierError::Handler(status)) => status,
            Err(BarrierError::Store(_)) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    macro_rules! route {
        ($sql:expr) => {
            post(
                |State(p): State<Pool>, h: HeaderMap, body: String| async move {
                    op(&p, &h, body, $sql).await
                },
            )
        };
    }
    let app = Router::new()
        .route("/try", route!("UPDATE holds SET available = available - $1, frozen = frozen + $1 WHERE account = $2 AND available >= $1"))
        .route("/confirm", route!("UPDATE holds SET frozen = frozen - $1, spent = spent + $1 WHERE account = $2"))
        .route("/cancel", route!("UPDATE holds SET frozen = frozen - $1, available = available + $1 WHERE account = $2"))
        .route("/credit", route!("UPDATE holds SET available = available + $1 WHERE account = $2"))
        .route(
            "/query",
            post(|State(p): State<Pool>, h: HeaderMap| async move {
                let Ok(branch) = Branch::from_headers(&h) else {
                    return StatusCode::BAD_REQUEST;
                };
                match barrier::query_prepared(&p, &branch.gid).await {
                    Ok(true) => StatusCode::OK,
                    Ok(false) => StatusCode::CONFLICT,
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                }
            }),
        )
        .with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, pool)
}

async fn holds(pool: &Pool, account: &str) -> (i64, i64, i64) {
    with_pool!(pool, p => sqlx::query_as("SELECT available, frozen, spent FROM holds WHERE account = $1")
        .bind(account)
        .fetch_one(p)
        .await
        .unwrap())
}

struct Running {
    client: SagaServiceClient<tonic::transport::Channel>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), trellis::AppError>>,
}

async fn coordinator(dir: &std::path::Path, database: Option<String>) -> Running {
    let mut set = vec![
        ("driver.backoff".to_owned(), "10ms".to_owned()),
        ("driver.max_backoff".to_owned(), "50ms".to_owned()),
        ("driver.poll".to_owned(), "20ms".to_owned()),
    ];
    if let Some(url) = database {
        set.push(("database.url".into(), url));
    }
    let config = Config::<SagaSettings>::builder()
        .set("test", set)
        .build()
        .await
        .unwrap();
    let service = trellis::service::bind::<Coordinator>(config, dir, ServerConfig::default())
        .await
        .unwrap();
    let addr = service.local_addr();
    let app = service.into_app(App::builder("saga"));
    let mut lifecycle = app.lifecycle();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(
        Duration::from_secs(10),
        lifecycle.wait_for(|s| *s == Lifecycle::Ready),
    )
    .await
    .expect("ready within 10 s")
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Running {
        client: SagaServiceClient::new(channel),
        stop,
        task,
    }
}

/// Waits until the saga is terminal; its last view.
async fn ended(client: &mut SagaServiceClient<tonic::transport::Channel>, gid: &str) -> SagaView {
    trellis_testkit::eventually(Duration::from_secs(20), &format!("{gid} ended"), || {
        let mut client = client.clone();
        async move {
            let saga = client
                .get_saga(GetSagaRequest { gid: gid.into() })
                .await
                .map_err(|s| format!("{s:?}"))?
                .into_inner();
            let terminal = [Status::Succeeded, Status::Compensated, Status::Aborted]
                .iter()
                .any(|s| *s as i32 == saga.status);
            if terminal {
                Ok(saga)
            } else {
                Err(format!("{saga:?}"))
            }
        }
    })
    .await
}

async fn kinds_on(participant_url: &str, log_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let (addr, pool) = participant(participant_url).await;
    let mut running = coordinator(dir.path(), log_url).await;
    let client = &mut running.client;
    let at = |path: &str| Endpoint::http(format!("http://{addr}/{path}"));

    // TCC: both Tries succeed → both confirmed.
    let tcc = |gid: &str, amount: i64| {
        Saga::tcc(gid)
            .add_tcc(
                "a",
                at("try"),
                at("confirm"),
                at("cancel"),
                format!("a:{amount}"),
            )
            .add_tcc(
                "b",
                at("try"),
                at("confirm"),
                at("cancel"),
                format!("b:{amount}"),
            )
    };
    tcc("tcc-1", 3).submit(client).await.unwrap();
    let saga = ended(client, "tcc-1").await;
    assert_eq!(saga.status, Status::Succeeded as i32, "{saga:?}");
    assert!(saga.steps.iter().all(|s| s.confirmed), "{saga:?}");
    assert_eq!(holds(&pool, "a").await, (97, 0, 3));
    assert_eq!(holds(&pool, "b").await, (2, 0, 3));

    // b cannot freeze 10: a's Try is cancelled, b's (refused) too — a null
    // cancellation, since its Try left nothing.
    tcc("tcc-2", 10).submit(client).await.unwrap();
    let saga = ended(client, "tcc-2").await;
    assert_eq!(saga.status, Status::Compensated as i32, "{saga:?}");
    assert_eq!(saga.failed_step, "b");
    assert!(saga.steps.iter().all(|s| !s.confirmed), "{saga:?}");
    assert_eq!(holds(&pool, "a").await, (97, 0, 3), "a's freeze released");
    assert_eq!(holds(&pool, "b").await, (2, 0, 3));

    // A message: prepare, the local transaction, submit → credited once.
    let msg = |gid: &str, timeout: Duration| {
        Saga::msg(gid, at("query"))
            .add_msg("credit", at("credit"), "a:7")
            .timeout_to_fail(timeout)
    };
    let local = |gid: &'static str| {
        let pool = pool.clone();
        async move {
            barrier::run(&pool, &barrier::msg_branch(gid), |tx| {
                Box::pin(async move {
                    with_tx!(tx, c => sqlx::query("INSERT INTO local_orders (id) VALUES ($1)")
                        .bind(gid)
                        .execute(&mut **c)
                        .await
                        .map(drop))
                })
            })
            .await
            .unwrap()
        }
    };
    let m1 = msg("msg-1", Duration::from_secs(60));
    m1.prepare(client).await.unwrap();
    let prepared = client
        .get_saga(GetSagaRequest {
            gid: "msg-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        prepared.status,
        Status::Prepared as i32,
        "nothing runs before the submit"
    );
    assert!(matches!(local("msg-1").await, Outcome::Done(())));
    m1.clone().submit(client).await.unwrap();
    m1.submit(client).await.unwrap(); // a retried submit is the same message
    assert_eq!(
        ended(client, "msg-1").await.status,
        Status::Succeeded as i32
    );
    assert_eq!(holds(&pool, "a").await, (104, 0, 3));

    // Committed but never submitted (the submitter died): checked back
    // after its timeout, found committed, run.
    let m2 = msg("msg-2", Duration::from_millis(200));
    m2.prepare(client).await.unwrap();
    assert!(matches!(local("msg-2").await, Outcome::Done(())));
    assert_eq!(
        ended(client, "msg-2").await.status,
        Status::Succeeded as i32
    );
    assert_eq!(holds(&pool, "a").await, (111, 0, 3));

    // Never committed: checked back, aborted; the local transaction
    // arriving afterwards is refused by the barrier, nothing credited.
    let m3 = msg("msg-3", Duration::from_millis(200));
    m3.prepare(client).await.unwrap();
    assert_eq!(ended(client, "msg-3").await.status, Status::Aborted as i32);
    assert!(matches!(
        local("msg-3").await,
        Outcome::Skipped(Skip::Hanging)
    ));
    let kept: i64 = with_pool!(&pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM local_orders WHERE id = 'msg-3'")
        .fetch_one(p)
        .await
        .unwrap());
    assert_eq!(kept, 0, "the late local transaction left nothing");
    assert_eq!(holds(&pool, "a").await, (111, 0, 3));

    // Concurrent: a and b at once, c once both succeeded; c is refused, so
    // c (a null compensation), then b and a are undone.
    let concurrent = Saga::new("par-1")
        .concurrent()
        .add("a", at("try"), at("cancel"), "a:1")
        .add("b", at("try"), at("cancel"), "b:1")
        .add("c", at("try"), at("cancel"), "b:100")
        .after(&["a", "b"]);
    concurrent.submit(client).await.unwrap();
    let saga = ended(client, "par-1").await;
    assert_eq!(saga.status, Status::Compensated as i32, "{saga:?}");
    assert_eq!(saga.failed_step, "c");
    assert!(
        saga.steps.iter().all(|s| s.called && s.compensated),
        "{saga:?}"
    );
    assert_eq!(holds(&pool, "a").await, (111, 0, 3));
    assert_eq!(holds(&pool, "b").await, (2, 0, 3));
    let chained = Saga::new("par-2")
        .concurrent()
        .add("a", at("try"), at("cancel"), "a:1")
        .add("b", at("try"), at("cancel"), "b:1")
        .after(&["a"]);
    chained.submit(client).await.unwrap();
    assert_eq!(
        ended(client, "par-2").await.status,
        Status::Succeeded as i32
    );
    assert_eq!(holds(&pool, "a").await, (110, 1, 3));
    assert_eq!(holds(&pool, "b").await, (1, 1, 3));

    // Bad requests are refused, naming the field.
    let bad = Saga::tcc("tcc-bad").add("a", at("try"), at("cancel"), "a:1");
    let refused = bad.submit(client).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("confirm"), "{refused:?}");
    let unprepared = Saga::new("saga-1").add("a", at("try"), at("cancel"), "a:1");
    let refused = unprepared.prepare(client).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let _ = running.stop.send(());
    running.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcc_and_messages_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    kinds_on(
        &format!("sqlite://{}", dir.path().join("bank.db").display()),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcc_and_messages_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    let admin = Pool::open(
        &pg.url(),
        2,
        Duration::from_secs(10),
        &trellis_store::migrator("_t", &[]),
    )
    .await
    .unwrap();
    with_pool!(&admin, p => sqlx::raw_sql("CREATE DATABASE bank").execute(p).await.map(drop))
        .unwrap();
    admin.close().await;
    let bank = format!("{}/bank", pg.url().trim_end_matches("/postgres"));
    kinds_on(&bank, Some(pg.url())).await;
}
