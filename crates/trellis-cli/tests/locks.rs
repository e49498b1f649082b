//! `trellis lock ls` against real etcd and Redis: the locks a service
//! holds, with their lease; a scheme it does not know, named.

use std::time::Duration;

use trellis_testkit::{Etcd, Redis};

fn ls(locks: &str, prefix: &str) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["lock", "ls", "--locks", locks, "--prefix", prefix])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_ls_shows_held_locks_in_etcd_and_redis() {
    let etcd = Etcd::start().unwrap();
    let redis = Redis::start().unwrap();
    for url in [format!("etcd://{}", etcd.addr()), redis.url()] {
        let locks = trellis_lock::connect(&url, "shop/", Default::default())
            .await
            .unwrap();
        let guard = locks
            .lock("stock:tea", Duration::from_secs(5))
            .await
            .unwrap();
        let (ok, out, err) = ls(&url, "shop/");
        assert!(ok, "{err}");
        let row = out
            .lines()
            .find(|l| l.starts_with("stock:tea"))
            .unwrap_or_else(|| panic!("{url}: {out}"));
        assert!(row.ends_with('s'), "a lease left: {row}");
        // Another prefix: not these locks.
        let (_, other, _) = ls(&url, "elsewhere/");
        assert!(!other.contains("stock:tea"), "{other}");
        assert!(guard.release().await.unwrap());
        let (_, after, _) = ls(&url, "shop/");
        assert!(!after.contains("stock:tea"), "released: {after}");
    }
    let (ok, _, err) = ls("zookeeper://x:1", "shop/");
    assert!(!ok);
    assert!(err.contains("zookeeper:// is not a lock backend"), "{err}");
}
