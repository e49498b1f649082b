//! What checking a bearer token costs a request: a token seen for the first
//! time (signature, header and claims checked against a key already in the
//! cached key set) and the same token again (the verified-token cache), for
//! Ed25519 and ES256; and signing one (the issuer's side).
//!
//! ```sh
//! cargo bench -p trellis-auth --bench verify
//! ```

use std::{hint::black_box, sync::Arc};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use trellis_auth::{JwkSet, Jwks, JwksTiming, SigningKey, StaticSource, Verifier, VerifierConfig};

fn claims() -> serde_json::Value {
    let now = jsonwebtoken::get_current_timestamp();
    serde_json::json!({
        "iss": "trellis", "aud": "shop", "sub": "01a22cdc-ad60-7467-97ef-2e4c42f2f70e",
        "exp": now + 3600, "iat": now, "nbf": now, "jti": "01a22cdc-ad60-7467-97ef-2e4c42f2f70f",
        "roles": ["customer"], "tenant": "default",
    })
}

/// A verifier whose key set (holding `key`) is already loaded.
fn verifier(runtime: &tokio::runtime::Runtime, key: &SigningKey) -> Verifier {
    let keys = Jwks::new(
        StaticSource::new(JwkSet {
            keys: vec![key.jwk().clone()],
        }),
        JwksTiming::default(),
    );
    runtime.block_on(keys.load()).expect("keys load");
    Verifier::new(VerifierConfig::new("trellis", "shop"), keys).expect("verifier")
}

/// The raw public key of `key`'s JWK (Ed25519 `x`; P-256 `04 ‖ x ‖ y`).
fn public_key(key: &SigningKey) -> Vec<u8> {
    let jwk = serde_json::to_value(key.jwk()).expect("jwk");
    let part = |name: &str| {
        base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            jwk[name].as_str().unwrap_or_default(),
        )
        .expect("base64")
    };
    match jwk["kty"].as_str() {
        Some("EC") => [vec![4u8], part("x"), part("y")].concat(),
        _ => part("x"),
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("jwt");
    for (name, key) in [
        ("ed25519", SigningKey::generate_ed25519("k1").expect("key")),
        ("es256", SigningKey::generate_es256("k1").expect("key")),
    ] {
        let token = key.sign(&claims()).expect("sign");
        // First sight: a fresh verifier (empty token cache, key loaded) each time.
        group.bench_function(format!("verify_first/{name}"), |b| {
            b.iter_batched(
                || verifier(&runtime, &key),
                |v| {
                    let claims = runtime.block_on(v.verify(black_box(&token)));
                    assert!(claims.is_ok());
                    (v, claims)
                },
                BatchSize::SmallInput,
            )
        });
        let warm = Arc::new(verifier(&runtime, &key));
        runtime.block_on(warm.verify(&token)).expect("verifies");
        group.bench_function(format!("verify_again/{name}"), |b| {
            b.iter(|| runtime.block_on(warm.verify(black_box(&token))).is_ok())
        });
        // The floor: the bare signature check of the same token by aws-lc.
        let (message, signature) = token.rsplit_once('.').expect("three parts");
        let signature =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature)
                .expect("base64");
        let public = public_key(&key);
        let alg: &'static dyn aws_lc_rs::signature::VerificationAlgorithm = match name {
            "ed25519" => &aws_lc_rs::signature::ED25519,
            _ => &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        };
        let unparsed = aws_lc_rs::signature::UnparsedPublicKey::new(alg, public);
        group.bench_function(format!("signature_only/{name}"), |b| {
            b.iter(|| {
                unparsed
                    .verify(black_box(message.as_bytes()), black_box(&signature))
                    .is_ok()
            })
        });
        group.bench_function(format!("sign/{name}"), |b| {
            b.iter(|| key.sign(black_box(&claims())).expect("sign"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
