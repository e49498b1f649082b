//! Saga throughput: `trellis up` (pinned to the CPUs in `SAGA_CPUS`, CPU 1
//! by default) with the coordinator, inventory and payment on SQLite or on
//! PostgreSQL, and N two-branch sagas — reserve stock, charge an account,
//! both behind the barrier — submitted by C concurrent callers straight to
//! the coordinator. Submit latency is timed here; completion is read from
//! the coordinator's log afterwards (`update_time - create_time` of every
//! saga), so nothing polls per saga.
//!
//!   saga_load sqlite|postgres N C
//!
//! Run by `scripts/bench/saga.sh`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use prost::Message as _;
use trellis_saga::{
    api::v1::{ListSagasRequest, Status, saga_service_client::SagaServiceClient},
    client::Saga,
    log::Endpoint,
};
use trellis_store::{Pool, with_pool};

const PRODUCTS: usize = 200;
const USERS: usize = 1000;

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn saga(i: usize) -> Saga {
    let order = format!("b{i}");
    let stock = shop_inventory::api::v1::StockRequest {
        order_id: order.clone(),
        lines: vec![shop_inventory::api::v1::Line {
            sku: format!("p{}", i % PRODUCTS),
            quantity: 1,
        }],
    }
    .encode_to_vec();
    let charge = shop_payment::api::v1::ChargeRequest {
        order_id: order.clone(),
        user_id: format!("u{}", i % USERS),
        amount_cents: 1,
    }
    .encode_to_vec();
    let stock_branch =
        |m: &str| Endpoint::grpc("inventory", format!("/shop.inventory.v1.StockBranches/{m}"));
    let pay_branch =
        |m: &str| Endpoint::grpc("payment", format!("/shop.payment.v1.PaymentBranches/{m}"));
    Saga::new(format!("bench-{i}"))
        .add(
            "reserve",
            stock_branch("Reserve"),
            stock_branch("Release"),
            stock,
        )
        .add("charge", pay_branch("Charge"), pay_branch("Refund"), charge)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let engine = args.get(1).map(String::as_str).unwrap_or("sqlite");
    let n: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let callers: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(64);
    let cpus = std::env::var("SAGA_CPUS").unwrap_or_else(|_| "1".into());
    let root = tempfile::tempdir()?;
    let conf = root.path().join("conf");
    std::fs::create_dir_all(&conf)?;

    let pg = if engine == "postgres" {
        Some(trellis_testkit::Postgres::start()?)
    } else {
        None
    };
    let mut urls = std::collections::HashMap::new();
    if let Some(pg) = &pg {
        let admin = Pool::open(
            &pg.url(),
            2,
            Duration::from_secs(10),
            &trellis_store::migrator("_bench", &[]),
        )
        .await?;
        let base = pg.url().trim_end_matches("/postgres").to_owned();
        for s in ["saga", "inventory", "payment", "order", "user", "auth"] {
            with_pool!(&admin, p => sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE shop_{s}"))).execute(p).await.map(drop))?;
            urls.insert(s, format!("{base}/shop_{s}"));
        }
        admin.close().await;
    }
    // Callers queue on the disk by design here: shed nothing.
    let database = |s: &str| {
        let db = urls
            .get(s)
            .map(|u| format!("[database]\nurl = \"{u}\"\nmax_connections = 32\n"))
            .unwrap_or_default();
        format!("{db}[server.shedding]\nqueue_delay = \"10s\"\n")
    };
    let mut seed = String::new();
    for p in 0..PRODUCTS {
        seed.push_str(&format!(
            "[[seed]]\nsku = \"p{p}\"\nname = \"p{p}\"\nprice_cents = 1\nstock = 1000000000\n"
        ));
    }
    std::fs::write(
        conf.join("inventory.toml"),
        format!("{seed}{}", database("inventory")),
    )?;
    std::fs::write(
        conf.join("payment.toml"),
        format!(
            "opening_balance_cents = 1000000000\n{}",
            database("payment")
        ),
    )?;
    std::fs::write(
        conf.join("saga.toml"),
        format!("[driver]\nmax_in_flight = 4096\n{}", database("saga")),
    )?;
    for s in ["order", "user", "auth"] {
        std::fs::write(conf.join(format!("{s}.toml")), database(s))?;
    }

    let base = trellis_testkit::free_port()?;
    let trellis = std::env::var("TRELLIS_BIN").unwrap_or_else(|_| "target/release/trellis".into());
    let mut command = Command::new("taskset");
    command
        .args([
            "-c",
            &cpus,
            &trellis,
            "up",
            "--base-port",
            &base.to_string(),
        ])
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .arg("--config")
        .arg(&conf)
        .arg("--admin-listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "warn");
    // Killed when dropped, here or on a panic.
    let up = trellis_testkit::Program::spawn(command)?;
    let coordinator = format!("http://127.0.0.1:{}", base + 3);
    let channel = tonic::transport::Endpoint::from_shared(coordinator)?.connect_lazy();
    let mut client = SagaServiceClient::new(channel);
    let within = Duration::from_secs(60);
    trellis_testkit::eventually(within, "the shop started", || {
        let mut client = client.clone();
        async move { client.list_sagas(ListSagasRequest::default()).await }
    })
    .await;
    // One saga through first: inventory and payment registered, the
    // coordinator's channels to them made.
    saga(usize::MAX).submit(&mut client).await?;
    trellis_testkit::eventually(within, "the first saga finished", || {
        let mut client = client.clone();
        async move {
            let probe = client
                .get_saga(trellis_saga::api::v1::GetSagaRequest {
                    gid: format!("bench-{}", usize::MAX),
                })
                .await
                .map_err(|s| format!("{s:?}"))?
                .into_inner();
            if probe.status == Status::Succeeded as i32 {
                Ok(())
            } else {
                Err(format!("{probe:?}"))
            }
        }
    })
    .await;

    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (next, mut client) = (next.clone(), client.clone());
        workers.spawn(async move {
            let mut submits = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, tonic::Status>(submits);
                }
                let t = Instant::now();
                saga(i).submit(&mut client).await?;
                submits.push(t.elapsed().as_micros() as i64);
            }
        });
    }
    let mut submits = Vec::new();
    while let Some(done) = workers.join_next().await {
        submits.extend(done??);
    }
    let submitted_in = started.elapsed();
    trellis_testkit::eventually(Duration::from_secs(600), "every saga ended", || {
        let mut client = client.clone();
        async move {
            let mut open = 0;
            for status in [Status::Running, Status::Compensating] {
                open += client
                    .list_sagas(ListSagasRequest {
                        status: status as i32,
                        page_size: 1,
                    })
                    .await
                    .map_err(|s| format!("{s:?}"))?
                    .into_inner()
                    .sagas
                    .len();
            }
            if open == 0 {
                Ok(())
            } else {
                Err("sagas still open".to_owned())
            }
        }
    })
    .await;
    let log_url = urls
        .get("saga")
        .cloned()
        .unwrap_or_else(|| format!("sqlite://{}", root.path().join("data/saga.db").display()));
    let log = Pool::open(
        &log_url,
        2,
        Duration::from_secs(10),
        &trellis_store::migrator("_bench", &[]),
    )
    .await?;
    let rows: Vec<(String, i64, i64)> = with_pool!(&log, p => sqlx::query_as("SELECT status, create_time_ms, update_time_ms FROM saga_transactions WHERE gid <> $1").bind(format!("bench-{}", usize::MAX)).fetch_all(p).await)?;
    log.close().await;
    drop(up);

    let succeeded = rows.iter().filter(|r| r.0 == "succeeded").count();
    let first = rows.iter().map(|r| r.1).min().unwrap_or(0);
    let last = rows.iter().map(|r| r.2).max().unwrap_or(0);
    let mut latency: Vec<i64> = rows.iter().map(|r| r.2 - r.1).collect();
    latency.sort_unstable();
    submits.sort_unstable();
    let secs = (last - first).max(1) as f64 / 1000.0;
    println!(
        "{engine}: {succeeded}/{n} sagas succeeded in {secs:.2} s = {:.0} sagas/s (submitted in {:.2} s); submit-to-done p50 {} ms p99 {} ms; submit ack p50 {:.1} ms p99 {:.1} ms",
        succeeded as f64 / secs,
        submitted_in.as_secs_f64(),
        percentile(&latency, 0.5),
        percentile(&latency, 0.99),
        percentile(&submits, 0.5) as f64 / 1000.0,
        percentile(&submits, 0.99) as f64 / 1000.0,
    );
    drop(pg);
    Ok(())
}
