//! Compiles the service's protos with protox (pure Rust, no protoc) and
//! keeps the encoded descriptor set — with its custom options, the
//! `google.api.http` routes among them — for reflection and REST.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = root.join("shop/auth/v1/auth.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("google/api").display()
    );
    let mut compiler = protox::Compiler::new([&root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files([&proto])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // `prost_types` drops extension options; protox's own encoding keeps them.
    std::fs::write(
        out.join("shop_auth_v1.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
