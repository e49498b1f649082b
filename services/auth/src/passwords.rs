//! Passwords: Argon2id hashes (PHC strings) computed off the async
//! threads, a bound on how many run at once (each holds `m` KiB), and a
//! decoy hash so a login for an unknown account costs what a real one does.

use std::sync::Arc;

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::SaltString,
};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;
use trellis::Error;

/// Argon2id's cost parameters (OWASP's minimum: 19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for Cost {
    fn default() -> Self {
        Cost {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Hashes and checks passwords.
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    permits: Arc<Semaphore>,
    decoy: Arc<str>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

fn argon2(params: Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn hash_blocking(params: Params, password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "no randomness".to_owned())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2(params)
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn internal(what: &str, detail: impl std::fmt::Display) -> Error {
    tracing::error!(error = %detail, "{what}");
    Error::internal(what.to_owned())
}

impl Passwords {
    /// Hashing at `cost`, at most `concurrency` at once.
    pub fn new(cost: Cost, concurrency: usize) -> Result<Passwords, String> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| format!("argon2 parameters: {e}"))?;
        let mut decoy_password = [0u8; 32];
        SystemRandom::new()
            .fill(&mut decoy_password)
            .map_err(|_| "no randomness".to_owned())?;
        let decoy = hash_blocking(params.clone(), &decoy_password)?;
        Ok(Passwords {
            params,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            decoy: decoy.into(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| internal("password hashing is shut down", e))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| internal("password hashing failed", e))
    }

    /// The PHC string of `password` with a fresh salt.
    pub async fn hash(&self, password: &str) -> Result<String, Error> {
        let params = self.params.clone();
        let password = password.to_owned();
        self.run(move || hash_blocking(params, password.as_bytes()))
            .await?
            .map_err(|e| internal("password hashing failed", e))
    }

    /// Whether `password` matches `phc` — or, with no `phc` (no such
    /// account), the same work against the decoy, answering false.
    pub async fn verify(&self, password: &str, phc: Option<&str>) -> Result<bool, Error> {
        let real = phc.is_some();
        let phc = phc.map_or_else(|| self.decoy.to_string(), str::to_owned);
        let password = password.to_owned();
        let matched = self
            .run(move || {
                PasswordHash::new(&phc)
                    .map(|parsed| {
                        // The hash's own parameters, so hashes made at an
                        // older cost still verify.
                        Argon2::default()
                            .verify_password(password.as_bytes(), &parsed)
                            .is_ok()
                    })
                    .map_err(|e| e.to_string())
            })
            .await?
            .map_err(|e| internal("a stored password hash is unreadable", e))?;
        Ok(real && matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Passwords {
        Passwords::new(
            Cost {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            2,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn hashes_are_argon2id_salted_and_verify() {
        let p = cheap();
        let a = p.hash("correct horse battery").await.unwrap();
        let b = p.hash("correct horse battery").await.unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(p.verify("correct horse battery", Some(&a)).await.unwrap());
        assert!(!p.verify("correct horse battery!", Some(&a)).await.unwrap());
        // No account: the decoy is checked and the answer is no, even for
        // the decoy's own (unknowable) password.
        assert!(!p.verify("anything", None).await.unwrap());
    }

    #[tokio::test]
    async fn owasp_cost_is_the_default() {
        let p = Passwords::new(Cost::default(), 1).unwrap();
        let h = p.hash("pw").await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    }
}
