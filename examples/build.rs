//! Compiles the example's proto with protox (no protoc) and keeps the
//! encoded descriptor set for reflection and REST.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ours = dir.join("proto");
    let shared = dir.join("../proto");
    let proto = ours.join("hello/v1/hello.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let mut compiler = protox::Compiler::new([&ours, &shared])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files([&proto])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("hello_v1.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
