//! What a read costs at each level of the cache (scripts/bench/engines.sh).
//!
//!   cargo run --release -p trellis-cache --features redis --example cache_bench

use std::time::{Duration, Instant};

use trellis_cache::{Cache, CacheSettings};
use trellis_core::Secret;

#[derive(serde::Serialize, serde::Deserialize)]
struct User {
    id: String,
    email: String,
    display_name: String,
    create_time_ms: i64,
    update_time_ms: i64,
}

fn user(i: usize) -> User {
    User {
        id: format!("0190f1c2-7a3b-7c4d-8e5f-{i:012}"),
        email: format!("user{i}@example.com"),
        display_name: format!("User {i}"),
        create_time_ms: 1_700_000_000_000,
        update_time_ms: 1_700_000_000_000,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let settings = CacheSettings {
        redis: Some(Secret::new(redis.url())),
        capacity: 1_000_000,
        ..Default::default()
    };
    let n = 20_000;
    let a: Cache<User> = Cache::new("bench", &settings).await.unwrap();
    let b: Cache<User> = Cache::new("bench", &settings).await.unwrap();
    // Loads (the loader is free): the cost of a miss, writing Redis.
    let started = Instant::now();
    for i in 0..n {
        a.get_or_load(&i.to_string(), || async { Ok::<_, ()>(Some(user(i))) })
            .await
            .unwrap();
    }
    let miss = started.elapsed() / n as u32;
    // The other instance: each key once, from Redis.
    let started = Instant::now();
    for i in 0..n {
        b.get_or_load(&i.to_string(), || async { Ok::<_, ()>(None) })
            .await
            .unwrap()
            .expect("in redis");
    }
    let redis_hit = started.elapsed() / n as u32;
    // Local hits.
    let rounds = 50;
    let started = Instant::now();
    for _ in 0..rounds {
        for i in 0..n {
            a.get_or_load(&i.to_string(), || async { Ok::<_, ()>(None) })
                .await
                .unwrap();
        }
    }
    let local = started.elapsed() / (n * rounds) as u32;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("| level | per read |");
    println!("|---|---|");
    println!("| local hit (moka) | {:.2} µs |", us(local));
    println!("| Redis hit (another instance) | {:.1} µs |", us(redis_hit));
    println!(
        "| miss: load (free loader) + write to Redis | {:.1} µs |",
        us(miss)
    );
}
