-- Written once for SQLite and PostgreSQL: only types both understand.
CREATE TABLE credentials (
    user_id        TEXT PRIMARY KEY,
    email          TEXT NOT NULL UNIQUE,
    password_hash  TEXT NOT NULL,
    roles          TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    create_time_ms BIGINT NOT NULL
);

-- Refresh tokens, by the SHA-256 of the token (the token itself is never
-- stored). A family is every token rotated from one login.
CREATE TABLE refresh_tokens (
    token_hash     TEXT PRIMARY KEY,
    family_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    create_time_ms BIGINT NOT NULL,
    expire_time_ms BIGINT NOT NULL,
    rotate_time_ms BIGINT,
    revoke_time_ms BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

-- Signing keys, private halves sealed under the key encryption key.
CREATE TABLE signing_keys (
    kid              TEXT PRIMARY KEY,
    alg              TEXT NOT NULL,
    sealed           TEXT NOT NULL,
    create_time_ms   BIGINT NOT NULL,
    activate_time_ms BIGINT NOT NULL
);
