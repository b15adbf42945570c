//! Every example in `examples/` is compiled into this test and run, and the README's library
//! snippet is checked to be the embedded example's code, so neither can rot.

use std::path::Path;

#[path = "../examples/embedded.rs"]
#[allow(dead_code)]
mod embedded;

#[path = "../examples/transactional.rs"]
#[allow(dead_code)]
mod transactional;

#[path = "../examples/network_producer.rs"]
#[allow(dead_code)]
mod network_producer;

#[path = "../examples/consumer_stream.rs"]
#[allow(dead_code)]
mod consumer_stream;

#[test]
fn embedded_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    embedded::run(dir.path()).unwrap();
}

#[test]
fn transactional_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    transactional::run(dir.path()).unwrap();
}

/// The consumer stream embedded: the same loop as over the network, the poison message given
/// back, the three orders acked.
#[test]
fn embedded_consumer_stream_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut seen = rt
        .block_on(consumer_stream::run_embedded(dir.path(), 3))
        .unwrap();
    seen.sort();
    assert_eq!(
        seen,
        ["order-42=created", "order-42=paid", "order-42=shipped"]
    );
}

/// The network examples against a broker served on 127.0.0.1 in the test: the producer's
/// three messages (a duplicate send stores nothing) come out of the consumer stream.
#[test]
fn network_examples_run() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let broker = halfmq::Broker::open(halfmq::BrokerConfig::new(dir.path())).unwrap();
        let config = halfmq_cli::server::ServerConfig::new("127.0.0.1:0".parse().unwrap());
        let server = halfmq_cli::server::Server::start(broker.clone(), config)
            .await
            .unwrap();
        let addr = server.local_addr().to_string();
        network_producer::run(&addr).await.unwrap();
        let mut seen = consumer_stream::run(&addr, 3).await.unwrap();
        seen.sort();
        assert_eq!(
            seen,
            ["order-42=created", "order-42=paid", "order-42=shipped"]
        );
        server.shutdown().await;
        broker.close().unwrap();
    });
}

/// The lines between the `// README:start` and `// README:end` markers, unindented.
fn marked_region(source: &str) -> Vec<String> {
    let start = source
        .find("// README:start")
        .expect("a README:start marker");
    let end = source.find("// README:end").expect("a README:end marker");
    let region = &source[start..end];
    let lines: Vec<&str> = region.lines().skip(1).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end().to_owned())
        .collect::<Vec<_>>()
        .into_iter()
        .skip_while(|l| l.is_empty())
        .collect()
}

#[test]
fn readme_library_snippet_is_the_embedded_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/embedded.rs")).unwrap();
    let section = readme
        .split("## Using it as a library")
        .nth(1)
        .expect("a library section in the README");
    let block = section
        .split("```rust\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a rust block in the library section");
    let mut want = marked_region(&example);
    while want.last().is_some_and(|l| l.is_empty()) {
        want.pop();
    }
    let got: Vec<String> = block
        .lines()
        .skip_while(|l| l.starts_with("use ") || l.is_empty())
        .map(|l| l.trim_end().to_owned())
        .collect();
    assert_eq!(
        got.join("\n"),
        want.join("\n"),
        "the README's library snippet differs from examples/embedded.rs between the README markers"
    );
}
