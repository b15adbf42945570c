//! The broker's connection state machine fed arbitrary bytes: after a valid Hello (or not),
//! whatever a client sends, the broker answers or closes that connection and keeps serving
//! others. One broker serves the whole fuzzing run; every input is one connection.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use halfmq_client::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
use halfmq_client::protocol::{self, Request};
use halfmq_cli::server::{Server, ServerConfig};
use halfmq::{Broker, BrokerConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    rt: tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    _server: Server,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        let mut config = BrokerConfig::new(dir.path());
        config.store.segment_bytes = 1 << 20;
        config.store.record_bytes_max = 64 * 1024;
        let broker = Broker::open(config).expect("broker");
        let server = rt
            .block_on(Server::start(
                broker,
                ServerConfig::new("127.0.0.1:0".parse().expect("addr"))
                    .with_frame_timeout(Duration::from_millis(200)),
            ))
            .expect("server");
        let addr = server.local_addr();
        Fixture { rt, addr, _server: server, _dir: dir }
    })
}

fn hello() -> Vec<u8> {
    let body = protocol::encode(&Request::Hello { client: "fuzz".into(), token: None }).expect("encode");
    let mut out = Vec::new();
    frame::encode_into(&mut out, FrameKind::Request, 1, &body, FRAME_BYTES_MAX_DEFAULT).expect("frame");
    out
}

async fn session(addr: std::net::SocketAddr, bytes: Vec<u8>) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
    let _ = s.write_all(&bytes).await;
    let _ = s.shutdown().await;
    let mut sink = vec![0u8; 64 * 1024];
    // Read whatever the broker answers until it closes (bounded in time).
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    true
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut bytes = Vec::new();
    // Half the inputs start with a valid handshake so the fuzzer reaches request handling.
    if data.first().is_some_and(|b| b & 1 == 1) {
        bytes.extend_from_slice(&hello());
    }
    bytes.extend_from_slice(data.get(1..).unwrap_or_default());
    assert!(f.rt.block_on(session(f.addr, bytes)), "the broker stopped accepting connections");
    // The broker still serves a well-behaved client.
    assert!(f.rt.block_on(session(f.addr, hello())));
});
