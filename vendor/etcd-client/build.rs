// Trellis patch: compiles the same five protos as upstream, with protox (a
// pure-Rust protobuf compiler) instead of protoc, so a build needs no protoc
// on PATH. The generated code is what upstream generates from the same
// descriptor set.

#[cfg(feature = "build-server")]
fn should_build_server() -> bool {
    true
}

#[cfg(not(feature = "build-server"))]
fn should_build_server() -> bool {
    false
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");

    let fds = protox::compile(
        [
            "proto/etcd/api/authpb/auth.proto",
            "proto/etcd/api/etcdserverpb/rpc.proto",
            "proto/etcd/api/mvccpb/kv.proto",
            "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
            "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        ],
        [proto_root],
    )?;
    tonic_prost_build::configure()
        .build_server(should_build_server())
        .compile_fds(fds)?;
    Ok(())
}
