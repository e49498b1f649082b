//! The build script of a Trellis service: compiles its protos with protox
//! (pure Rust — no `protoc` on the machine), generates the tonic server
//! and client, and writes the encoded descriptor set — with its custom
//! options, the `google.api.http` routes and validation rules among them —
//! for reflection, the REST face and OpenAPI.
//!
//! ```no_run
//! // build.rs
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
//!     trellis_build::compile(&root, &["shop/user/v1/user.proto"], "shop_user_v1.bin")
//! }
//! // src/api.rs
//! // include!(concat!(env!("OUT_DIR"), "/shop.user.v1.rs"));
//! // pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/shop_user_v1.bin"));
//! ```

#![warn(missing_docs)]

use std::path::Path;

/// Compiles `protos` (paths under `root`, which also holds their imports)
/// into `$OUT_DIR/{package}.rs` and the descriptor set into
/// `$OUT_DIR/{descriptor_file}`; tells cargo to rerun when they change.
pub fn compile(
    root: &Path,
    protos: &[&str],
    descriptor_file: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    compile_with(root, protos, descriptor_file, &[])
}

/// [`compile`], with packages another crate already generated mapped to
/// its Rust paths (`(".trellis.saga.v1", "::trellis_saga::api::v1")`)
/// instead of generated again.
pub fn compile_with(
    root: &Path,
    protos: &[&str],
    descriptor_file: &str,
    extern_paths: &[(&str, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<_> = protos.iter().map(|p| root.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("google/api").display()
    );
    let mut compiler = protox::Compiler::new([root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(&files)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // `prost_types` drops extension options; protox's own encoding keeps them.
    std::fs::write(
        out.join(descriptor_file),
        compiler.encode_file_descriptor_set(),
    )?;
    let mut config = tonic_prost_build::configure();
    for (proto, rust) in extern_paths {
        config = config.extern_path(*proto, *rust);
    }
    config.compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
