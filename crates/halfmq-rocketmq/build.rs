//! Generates the gRPC code of `apache.rocketmq.v2` from `vendor/proto/` at build time, with a
//! protobuf compiler written in Rust (protox), so no system `protoc` is needed. The `.proto`
//! files are the protocol's definition (apache/rocketmq-apis), kept under `vendor/` because
//! their names and field numbers are fixed by RocketMQ, not by halfmq.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "vendor/proto/apache/rocketmq/v2/definition.proto",
        "vendor/proto/apache/rocketmq/v2/service.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["vendor/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
