//! The coordinator's log on SQLite and PostgreSQL: submissions are durable
//! and unique, work is claimed under a lease, a coordinator that lost its
//! lease cannot write, and two coordinators on one PostgreSQL never claim
//! the same saga.

use std::{collections::BTreeSet, time::Duration};

use trellis_saga::{
    barrier::Op,
    log::{Definition, Endpoint, LogError, SagaLog, StepDefinition, migrator},
    machine::{Answer, Status},
};
use trellis_store::Pool;

fn definition(steps: usize) -> Definition {
    Definition {
        steps: (0..steps)
            .map(|i| StepDefinition {
                name: format!("step{i}"),
                action: Endpoint::Grpc {
                    service: "inventory".into(),
                    path: "/shop.inventory.v1.InventoryService/Reserve".into(),
                },
                compensate: Endpoint::Http {
                    url: "http://inventory/v1/release".into(),
                },
                payload: vec![0, 1, 2, 255],
                confirm: None,
                after: Vec::new(),
            })
            .collect(),
        timeout_to_fail_ms: 30_000,
        traceparent: None,
        kind: Default::default(),
        query: None,
        concurrent: false,
    }
}

async fn log(url: &str) -> SagaLog {
    SagaLog::new(
        Pool::open(url, 8, Duration::from_secs(10), &migrator())
            .await
            .unwrap(),
    )
}

async fn batched_log(url: &str) -> SagaLog {
    SagaLog::batched(
        Pool::open(url, 8, Duration::from_secs(10), &migrator())
            .await
            .unwrap(),
        64,
    )
}

async fn the_log_on(url: &str, batched: bool) {
    let log = if batched {
        batched_log(url).await
    } else {
        log(url).await
    };
    log.submit("g1", &definition(2)).await.unwrap();
    assert!(matches!(
        log.submit("g1", &definition(2)).await,
        Err(LogError::Duplicate(_))
    ));
    let got = log.get("g1").await.unwrap().unwrap();
    assert_eq!(
        got.definition,
        definition(2),
        "bytes survive the round trip"
    );
    assert_eq!(got.state.status, Status::Running);

    // A claims it; B finds nothing while A's lease lives.
    let mut a = log.claim("a", Duration::from_secs(60), 10).await.unwrap();
    assert_eq!(a.len(), 1);
    assert!(
        log.claim("b", Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let mut state = a[0].record.state.clone();
    state.calling(0, Op::Action);
    state.record(0, Op::Action, Answer::Success);
    let before = a[0].record.lease_until_ms;
    log.save(&mut a[0], "a", &state, 0, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        a[0].record.lease_until_ms > before,
        "each write renews the lease"
    );
    assert_eq!(log.get("g1").await.unwrap().unwrap().state, state);

    // A pauses past its lease; B takes over; A's late write is refused.
    log.release(&a[0], "a").await.unwrap();
    let mut b = log.claim("b", Duration::from_secs(60), 10).await.unwrap();
    assert_eq!(b.len(), 1, "released, so claimable");
    let mut stale = state.clone();
    stale.record(1, Op::Action, Answer::Failure);
    assert!(matches!(
        log.save(&mut a[0], "a", &stale, 0, Duration::from_secs(60))
            .await,
        Err(LogError::LeaseLost(_))
    ));
    state.record(1, Op::Action, Answer::Success);
    log.save(&mut b[0], "b", &state, 0, Duration::from_secs(60))
        .await
        .unwrap();
    let done = log.get("g1").await.unwrap().unwrap();
    assert_eq!(done.state.status, Status::Succeeded);
    // Terminal sagas are never claimed again; listing filters by status.
    log.release(&b[0], "b").await.unwrap();
    assert!(
        log.claim("c", Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    log.submit("g2", &definition(1)).await.unwrap();
    let running = log.list(Some(Status::Running), 10).await.unwrap();
    assert_eq!(
        running.iter().map(|r| r.gid.as_str()).collect::<Vec<_>>(),
        ["g2"]
    );
    assert_eq!(log.list(None, 10).await.unwrap().len(), 2);

    // Many writers at once (with group commit, they share commits): each
    // answered for its own write; a gid submitted twice at once is taken
    // by exactly one.
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..300 {
        let log = log.clone();
        writers.spawn(async move { log.submit(&format!("c{}", i % 200), &definition(1)).await });
    }
    let (mut ok, mut duplicate) = (0, 0);
    while let Some(done) = writers.join_next().await {
        match done.unwrap() {
            Ok(()) => ok += 1,
            Err(LogError::Duplicate(_)) => duplicate += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, duplicate), (200, 100));
    assert_eq!(log.list(None, 1000).await.unwrap().len(), 202);

    // Many saves at once, each fenced by its own lease: every one lands,
    // and one naming a stale lease (among them) is refused alone.
    let claimed = log.claim("d", Duration::from_secs(60), 500).await.unwrap();
    assert_eq!(claimed.len(), 201, "g2 and the 200 c*");
    let mut savers = tokio::task::JoinSet::new();
    for (i, mut c) in claimed.into_iter().enumerate() {
        let log = log.clone();
        savers.spawn(async move {
            let mut state = c.record.state.clone();
            state.calling(0, Op::Action);
            state.record(0, Op::Action, Answer::Success);
            if i == 7 {
                c.record.lease_until_ms -= 1; // not the lease it holds
            }
            (
                i,
                log.save(&mut c, "d", &state, 0, Duration::from_secs(60))
                    .await,
            )
        });
    }
    while let Some(done) = savers.join_next().await {
        match done.unwrap() {
            (7, saved) => assert!(matches!(saved, Err(LogError::LeaseLost(_))), "{saved:?}"),
            (_, saved) => saved.unwrap(),
        }
    }
    let finished = log.list(Some(Status::Succeeded), 1000).await.unwrap();
    assert_eq!(finished.len(), 1 + 200, "g1 and all but one of the 201");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    for batched in [false, true] {
        the_log_on(
            &format!(
                "sqlite://{}",
                dir.path().join(format!("saga-{batched}.db")).display()
            ),
            batched,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_on_postgres() {
    for batched in [false, true] {
        let pg = trellis_testkit::Postgres::start().unwrap();
        the_log_on(&pg.url(), batched).await;
    }
}

/// Two coordinators claiming concurrently from one PostgreSQL: every saga
/// is claimed by exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_sharing_postgres_never_claim_the_same_saga() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    let log = log(&pg.url()).await;
    for i in 0..200 {
        log.submit(&format!("g{i:03}"), &definition(1))
            .await
            .unwrap();
    }
    let claim_all = |owner: &'static str, log: SagaLog| async move {
        let mut mine = Vec::new();
        loop {
            let got = log.claim(owner, Duration::from_secs(60), 7).await.unwrap();
            if got.is_empty() {
                return mine;
            }
            mine.extend(got.into_iter().map(|c| c.record.gid));
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(claim_all("a", log.clone())),
        tokio::spawn(claim_all("b", log.clone()))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (sa, sb): (BTreeSet<_>, BTreeSet<_>) = (a.iter().collect(), b.iter().collect());
    assert_eq!(sa.len(), a.len(), "a claimed something twice");
    assert!(
        sa.is_disjoint(&sb),
        "both claimed {:?}",
        sa.intersection(&sb).collect::<Vec<_>>()
    );
    assert_eq!(a.len() + b.len(), 200);
}
