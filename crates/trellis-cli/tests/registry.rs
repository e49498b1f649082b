//! `trellis serve --registry etcd://` against a real etcd: registration,
//! crash (SIGKILL: gone after the TTL), clean stop (SIGTERM: gone at once),
//! and `trellis registry ls`.

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::Trellis;
use trellis::registry::{Discovery, EtcdOptions, EtcdRegistry, InstanceSet};
use trellis_testkit::Etcd;

async fn watch_users(etcd: &Etcd) -> tokio::sync::watch::Receiver<InstanceSet> {
    let registry = EtcdRegistry::connect(EtcdOptions::new([etcd.endpoint()]))
        .await
        .unwrap();
    registry.watch("user").await.unwrap()
}

fn serve(etcd: &Etcd, data: &std::path::Path, ttl_secs: u64) -> (Trellis, String) {
    let listen = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap());
    let registry = format!("etcd://{}?ttl={ttl_secs}s", etcd.addr());
    let mut trellis = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().unwrap(),
        "--registry",
        &registry,
        "--zone",
        "z1",
    ]);
    trellis.line_starting_with("user serving");
    (trellis, listen)
}

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<InstanceSet>,
    within: Duration,
    f: impl FnMut(&InstanceSet) -> bool,
) {
    tokio::time::timeout(within, rx.wait_for(f))
        .await
        .expect("registry did not reach the expected state")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_disappears_after_its_ttl() {
    let etcd = Etcd::start().unwrap();
    let mut users = watch_users(&etcd).await;
    let data = tempfile::tempdir().unwrap();
    let (mut trellis, listen) = serve(&etcd, data.path(), 2);
    wait_for(&mut users, Duration::from_secs(10), |s| s.len() == 1).await;
    let instance = users.borrow().first().cloned().unwrap();
    assert_eq!(instance.endpoint("grpc"), Some(listen.as_str()));
    assert_eq!(instance.zone, "z1");

    let killed = Instant::now();
    trellis.signal(libc::SIGKILL);
    trellis.wait(Duration::from_secs(5));
    // Nobody deregistered it: it stays until the lease expires (the lease
    // had at least TTL - one renewal interval, ~1.3 s, left at the kill).
    wait_for(&mut users, Duration::from_secs(10), |s| s.is_empty()).await;
    let gone = killed.elapsed();
    eprintln!("SIGKILL -> gone from the registry: {gone:?} (TTL 2 s)");
    assert!(
        gone >= Duration::from_secs(1),
        "removed too early: {gone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_disappears_at_once_and_ls_shows_it_before() {
    let etcd = Etcd::start().unwrap();
    let mut users = watch_users(&etcd).await;
    let data = tempfile::tempdir().unwrap();
    let (mut trellis, listen) = serve(&etcd, data.path(), 10);
    wait_for(&mut users, Duration::from_secs(10), |s| s.len() == 1).await;

    let ls = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "registry",
            "ls",
            "user",
            "--registry",
            &format!("etcd://{}", etcd.addr()),
        ])
        .output()
        .unwrap();
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let out = String::from_utf8_lossy(&ls.stdout);
    let row = out
        .lines()
        .find(|l| l.starts_with("user"))
        .unwrap_or_else(|| panic!("no user row in:\n{out}"));
    assert!(
        row.contains(&format!("grpc={listen}")) && row.contains("z1") && row.contains("0.1.0"),
        "{row}"
    );
    let ttl: u64 = row
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((1..=10).contains(&ttl), "{row}");

    let stopped = Instant::now();
    trellis.signal(libc::SIGTERM);
    wait_for(&mut users, Duration::from_secs(3), |s| s.is_empty()).await;
    eprintln!(
        "SIGTERM -> gone from the registry: {:?} (TTL 10 s)",
        stopped.elapsed()
    );
    assert_eq!(trellis.wait(Duration::from_secs(15)).code(), Some(0));
}

/// Successful calls so far, shared with the callers.
type Progress = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Waits (up to 20 s) until `progress` reaches `at_least` successful calls.
async fn wait_progress(progress: &Progress, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = progress.load(std::sync::atomic::Ordering::SeqCst);
        if now >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {now} successful calls of {at_least} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls ListUsers in a loop from `callers` tasks until `stop`, counting
/// successes in `progress`; returns (ok, failed).
fn call_in_a_loop(
    channel: trellis::TracedChannel,
    callers: usize,
    stop: tokio_util::sync::CancellationToken,
    progress: Progress,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    use shop_user::api::v1::{ListUsersRequest, user_service_client::UserServiceClient};
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let (channel, stop, progress) = (channel.clone(), stop.clone(), progress.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = UserServiceClient::new(channel);
                let (mut ok, mut failed) = (0u64, Vec::new());
                while !stop.is_cancelled() {
                    match client
                        .list_users(ListUsersRequest {
                            page_size: 1,
                            page_token: String::new(),
                        })
                        .await
                    {
                        Ok(_) => {
                            ok += 1;
                            progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(status) => {
                            failed.push(format!("{:?}: {}", status.code(), status.message()))
                        }
                    }
                }
                (ok, failed)
            }));
        }
        let (mut ok, mut failed) = (0, Vec::new());
        for t in tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_no_failed_call_while_an_instance_stops_with_sigterm() {
    let etcd = Etcd::start().unwrap();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut first, _) = serve(&etcd, d1.path(), 5);
    let (mut second, _) = serve(&etcd, d2.path(), 5);
    let registry = EtcdRegistry::connect(EtcdOptions::new([etcd.endpoint()]))
        .await
        .unwrap();
    let channel = trellis::client(&registry, "user").await.unwrap();
    let mut users = registry.watch("user").await.unwrap();
    wait_for(&mut users, Duration::from_secs(10), |s| s.len() == 2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while channel.get_ref().endpoints().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the client never saw both instances"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let stop = tokio_util::sync::CancellationToken::new();
    let progress = Progress::default();
    let calls = call_in_a_loop(channel.clone(), 8, stop.clone(), progress.clone());
    // Calls flow to both before the stop, and go on after it.
    wait_progress(&progress, 100).await;
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait(Duration::from_secs(15)).code(), Some(0));
    let after_exit = progress.load(std::sync::atomic::Ordering::SeqCst);
    wait_progress(&progress, after_exit + 100).await;
    stop.cancel();
    let (ok, failed) = calls.await.unwrap();
    eprintln!("calls during the stop: {ok} ok, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} failed calls, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(ok > 100, "too few calls to mean anything: {ok}");
    assert_eq!(channel.get_ref().endpoints().len(), 1);
    second.signal(libc::SIGTERM);
    second.wait(Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_call_cached_endpoints_while_etcd_is_down_and_instances_reregister() {
    let mut etcd = Etcd::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (mut server, listen) = serve(&etcd, data.path(), 2);
    let registry = EtcdRegistry::connect(EtcdOptions::new([etcd.endpoint()]))
        .await
        .unwrap();
    let mut users = registry.watch("user").await.unwrap();
    wait_for(&mut users, Duration::from_secs(10), |s| s.len() == 1).await;
    let channel = trellis::client(&registry, "user").await.unwrap();

    etcd.stop();
    let stop = tokio_util::sync::CancellationToken::new();
    let progress = Progress::default();
    let calls = call_in_a_loop(channel.clone(), 2, stop.clone(), progress.clone());
    // An outage longer than the TTL (real time is the point here): nothing
    // in the client depends on etcd being up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_progress(&progress, 11).await;
    stop.cancel();
    let (ok, failed) = calls.await.unwrap();
    assert!(
        failed.is_empty() && ok > 10,
        "{ok} ok, {} failed while etcd was down",
        failed.len()
    );

    // etcd comes back empty; the instance registers itself again.
    etcd.restart(true).unwrap();
    let fresh = EtcdRegistry::connect(EtcdOptions::new([etcd.endpoint()]))
        .await
        .unwrap();
    let mut again = fresh.watch("user").await.unwrap();
    wait_for(&mut again, Duration::from_secs(15), |s| s.len() == 1).await;
    assert_eq!(again.borrow()[0].endpoint("grpc"), Some(listen.as_str()));
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
}
