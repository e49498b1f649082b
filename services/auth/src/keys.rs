//! The keys that sign access tokens: sealed at rest, published before they
//! sign, kept published until every token they signed has expired.
//!
//! A key's life:
//! 1. **Created** by `trellis auth keys rotate` (or at the service's first
//!    start), stored sealed — AES-256-GCM under the master key, its `kid`
//!    as associated data, so a sealed key cannot be swapped for another's.
//! 2. **Pending** until its activation time: published in the JWKS, not
//!    used yet, so every verifier can learn it before the first token it
//!    signs arrives.
//! 3. **Active**: the newest key whose activation time has passed signs.
//! 4. **Retiring** once a newer key is active: still published for the
//!    access-token lifetime (plus leeway), then dropped from the JWKS.
//!
//! Every instance reloads the table every `keys.reload_interval`, so a key
//! rotated by the command reaches all of them without a restart.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use trellis::auth::{Algorithm, SigningKey};

use crate::data::{AuthStore, StoredKey};

/// The master key that seals signing keys at rest.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// Why a key could not be sealed, opened or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The master key is not 32 bytes of base64.
    #[error("{source_name}: the key encryption key must be 32 bytes, base64-encoded")]
    BadMasterKey {
        /// Where it came from.
        source_name: String,
    },
    /// The master key file could not be read or written.
    #[error("key encryption key file {path}: {error}")]
    MasterKeyFile {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A sealed key does not open under this master key.
    #[error(
        "signing key {kid} cannot be opened: it was sealed under another key encryption key, or changed"
    )]
    Unseal {
        /// The key's id.
        kid: String,
    },
    /// Anything else about a key.
    #[error("signing key: {0}")]
    Other(String),
}

impl Sealer {
    /// A sealer over `key` (32 bytes).
    pub fn new(key: &[u8], source_name: &str) -> Result<Sealer, KeyError> {
        let bad = || KeyError::BadMasterKey {
            source_name: source_name.to_owned(),
        };
        if key.len() != 32 {
            return Err(bad());
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| bad())?;
        Ok(Sealer {
            key: LessSafeKey::new(unbound),
        })
    }

    /// From base64 text (config).
    pub fn from_base64(text: &str, source_name: &str) -> Result<Sealer, KeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::BadMasterKey {
                source_name: source_name.to_owned(),
            })?;
        Sealer::new(&bytes, source_name)
    }

    /// From a file holding the base64 key, created (mode 0600) with a new
    /// random key if missing: the embedded default, so `trellis up` needs
    /// no setup. Production sets `keys.encryption_key` from a secret store.
    pub fn from_file(path: &Path) -> Result<Sealer, KeyError> {
        let shown = path.display().to_string();
        let io = |error| KeyError::MasterKeyFile {
            path: shown.clone(),
            error,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Sealer::from_base64(&text, &shown),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| KeyError::Other("no randomness".into()))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                match write_private(path, STANDARD.encode(key).as_bytes()) {
                    Ok(()) => {}
                    // Another instance made it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let text = std::fs::read_to_string(path).map_err(io)?;
                        return Sealer::from_base64(&text, &shown);
                    }
                    Err(e) => return Err(io(e)),
                }
                tracing::warn!(
                    file = %shown,
                    "created a key encryption key for signing keys; set keys.encryption_key in production"
                );
                Sealer::new(&key, &shown)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// `plain` sealed, bound to `kid`: base64 of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, kid: &str, plain: &[u8]) -> Result<String, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Other("no randomness".into()))?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kid.as_bytes()),
                &mut data,
            )
            .map_err(|_| KeyError::Other("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(STANDARD.encode(out))
    }

    /// The plain bytes of a sealed key, if it was sealed under this key for
    /// `kid` and not changed since.
    pub fn open(&self, kid: &str, sealed: &str) -> Result<Vec<u8>, KeyError> {
        let unseal = || KeyError::Unseal {
            kid: kid.to_owned(),
        };
        let bytes = STANDARD.decode(sealed).map_err(|_| unseal())?;
        if bytes.len() < NONCE_LEN {
            return Err(unseal());
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unseal())?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut data)
            .map_err(|_| unseal())?;
        Ok(plain.to_vec())
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The signing algorithms keys can be made for.
pub fn algorithm(name: &str) -> Result<Algorithm, KeyError> {
    match name {
        "EdDSA" => Ok(Algorithm::EdDSA),
        "ES256" => Ok(Algorithm::ES256),
        "RS256" => Ok(Algorithm::RS256),
        other => Err(KeyError::Other(format!(
            "algorithm {other:?} is not supported: use EdDSA, ES256 or RS256"
        ))),
    }
}

/// Makes a new key of `alg`, activating `activate_in` from now, and
/// stores it sealed. Returns its id and activation time.
pub async fn create(
    store: &AuthStore,
    sealer: &Sealer,
    alg: Algorithm,
    activate_in: Duration,
) -> Result<StoredKey, Box<dyn std::error::Error + Send + Sync>> {
    let now = crate::now_ms();
    let kid = uuid::Uuid::now_v7().simple().to_string();
    let key = match alg {
        Algorithm::EdDSA => SigningKey::generate_ed25519(kid.clone()),
        Algorithm::ES256 => SigningKey::generate_es256(kid.clone()),
        Algorithm::RS256 => SigningKey::generate_rs256(kid.clone()),
        other => Err(format!("{other:?} keys cannot be generated")),
    }
    .map_err(KeyError::Other)?;
    let stored = StoredKey {
        kid: kid.clone(),
        alg: format!("{alg:?}"),
        sealed: sealer.seal(&kid, key.pkcs8())?,
        create_time_ms: now,
        activate_time_ms: now
            .saturating_add(i64::try_from(activate_in.as_millis()).unwrap_or(i64::MAX)),
    };
    store.insert_key(&stored).await?;
    Ok(stored)
}

/// One opened key and when it signs.
#[derive(Debug)]
pub struct RingKey {
    /// The key.
    pub key: SigningKey,
    /// From when it signs (ms since the epoch).
    pub activate_time_ms: i64,
}

/// The keys in force: every instance's view of the table, reloaded.
#[derive(Debug)]
pub struct KeyRing {
    keys: RwLock<Arc<Vec<Arc<RingKey>>>>,
    sealer: Sealer,
    /// How long a retired key stays published: the access-token lifetime
    /// plus the verifiers' leeway.
    retire_after_ms: i64,
}

impl KeyRing {
    /// An empty ring; [`reload`](Self::reload) fills it.
    pub fn new(sealer: Sealer, retire_after: Duration) -> KeyRing {
        KeyRing {
            keys: RwLock::new(Arc::new(Vec::new())),
            sealer,
            retire_after_ms: i64::try_from(retire_after.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// The master key.
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Reads the table again; keys that do not open are skipped and logged
    /// (one bad row must not stop signing with the good ones).
    pub async fn reload(&self, store: &AuthStore) -> Result<usize, trellis_store::Failure> {
        let stored = store.keys().await?;
        let current = self.all();
        let mut keys = Vec::with_capacity(stored.len());
        for row in stored {
            if let Some(known) = current.iter().find(|k| k.key.kid() == row.kid) {
                keys.push(known.clone());
                continue;
            }
            let opened = algorithm(&row.alg)
                .and_then(|alg| Ok((alg, self.sealer.open(&row.kid, &row.sealed)?)))
                .and_then(|(alg, der)| {
                    SigningKey::from_pkcs8(row.kid.clone(), alg, &der).map_err(KeyError::Other)
                });
            match opened {
                Ok(key) => keys.push(Arc::new(RingKey {
                    key,
                    activate_time_ms: row.activate_time_ms,
                })),
                Err(e) => tracing::error!(kid = %row.kid, error = %e, "skipping a signing key"),
            }
        }
        keys.sort_by_key(|k| k.activate_time_ms);
        let n = keys.len();
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        Ok(n)
    }

    fn all(&self) -> Arc<Vec<Arc<RingKey>>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the key `kid` opened (a key sealed under another key
    /// encryption key, or changed, did not).
    pub fn contains(&self, kid: &str) -> bool {
        self.all().iter().any(|k| k.key.kid() == kid)
    }

    /// The key that signs at `now_ms`: the newest one already active.
    pub fn signing(&self, now_ms: i64) -> Option<Arc<RingKey>> {
        self.all()
            .iter()
            .rev()
            .find(|k| k.activate_time_ms <= now_ms)
            .cloned()
    }

    /// The keys published at `now_ms`: pending, active, and retired ones
    /// whose tokens may still be valid.
    pub fn published(&self, now_ms: i64) -> Vec<Arc<RingKey>> {
        let all = self.all();
        all.iter()
            .enumerate()
            .filter(|(i, k)| {
                if k.activate_time_ms > now_ms {
                    return true;
                }
                // Superseded when the next key activated (if it has).
                match all.get(i + 1) {
                    Some(next) if next.activate_time_ms <= now_ms => {
                        next.activate_time_ms.saturating_add(self.retire_after_ms) > now_ms
                    }
                    _ => true,
                }
            })
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// A JWK's public parameters as the API carries them.
pub fn to_api(key: &SigningKey) -> crate::api::v1::JsonWebKey {
    let value = serde_json::to_value(key.jwk()).unwrap_or_default();
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    crate::api::v1::JsonWebKey {
        kty: field("kty").unwrap_or_default(),
        kid: key.kid().to_owned(),
        alg: format!("{:?}", key.algorithm()),
        r#use: "sig".to_owned(),
        crv: field("crv"),
        x: field("x"),
        y: field("y"),
        n: field("n"),
        e: field("e"),
    }
}

/// A fresh random token of `bytes` bytes, base64url.
pub fn random_token(bytes: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeyError::Other("no randomness".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// SHA-256 of `text`, hex: how refresh tokens are stored.
pub fn digest(text: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_under_their_kid_and_master_key() {
        let sealer = Sealer::new(&[7u8; 32], "test").unwrap();
        let sealed = sealer.seal("k1", b"secret der").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(sealer.open("k1", &sealed).unwrap(), b"secret der");
        assert!(matches!(
            sealer.open("k2", &sealed),
            Err(KeyError::Unseal { .. })
        ));
        let other = Sealer::new(&[8u8; 32], "test").unwrap();
        assert!(other.open("k1", &sealed).is_err());
        let mut tampered = STANDARD.decode(&sealed).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(sealer.open("k1", &STANDARD.encode(tampered)).is_err());
    }

    #[test]
    fn master_keys_must_be_32_bytes() {
        assert!(Sealer::from_base64(&STANDARD.encode([1u8; 16]), "keys.encryption_key").is_err());
        assert!(Sealer::from_base64("not base64!", "keys.encryption_key").is_err());
        assert!(Sealer::from_base64(&STANDARD.encode([1u8; 32]), "keys.encryption_key").is_ok());
    }

    #[test]
    fn a_missing_master_key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth/keys.secret");
        let first = Sealer::from_file(&path).unwrap();
        let sealed = first.seal("k", b"x").unwrap();
        let again = Sealer::from_file(&path).unwrap();
        assert_eq!(again.open("k", &sealed).unwrap(), b"x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    fn ring_with(times: &[i64]) -> KeyRing {
        let ring = KeyRing::new(
            Sealer::new(&[1u8; 32], "t").unwrap(),
            Duration::from_secs(100),
        );
        let keys = times
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                Arc::new(RingKey {
                    key: SigningKey::generate_ed25519(format!("k{i}")).unwrap(),
                    activate_time_ms: t,
                })
            })
            .collect();
        *ring.keys.write().unwrap() = Arc::new(keys);
        ring
    }

    #[test]
    fn keys_publish_before_signing_and_retire_after_their_tokens_expire() {
        // k0 active from 0, k1 from 1000, k2 pending from 500_000.
        let ring = ring_with(&[0, 1000, 500_000]);
        let kids = |now| {
            ring.published(now)
                .iter()
                .map(|k| k.key.kid().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(ring.signing(500).unwrap().key.kid(), "k0");
        assert_eq!(
            kids(500),
            ["k0", "k1", "k2"],
            "k1 published before it signs"
        );
        assert_eq!(ring.signing(1000).unwrap().key.kid(), "k1");
        assert_eq!(
            kids(100_999),
            ["k0", "k1", "k2"],
            "k0 kept while its tokens live"
        );
        assert_eq!(kids(101_000), ["k1", "k2"], "k0 dropped after 100 s");
        assert_eq!(ring.signing(500_000).unwrap().key.kid(), "k2");
        assert!(ring_with(&[10]).signing(5).is_none());
    }
}
