//! What the RocketMQ examples share: a broker with the topic `bench` on a temporary
//! directory, the endpoint on a runtime of its own (named threads, so that the serving
//! side's CPU can be counted apart from the clients'), and the official producer connected
//! to it.

use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, BrokerConfig};
use halfmq_rocketmq::RocketMqServer;
use rocketmq::conf::{ClientOption, ProducerOption};
use rocketmq::Producer;

/// The command line's numbers (anything else is left out), in order.
pub fn numbers() -> Vec<usize> {
    std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// The broker, the endpoint serving it and a producer connected to the endpoint.
pub struct Served {
    /// The broker's data directory, removed when this is dropped.
    pub _dir: tempfile::TempDir,
    pub broker: Arc<Broker>,
    /// The runtime the endpoint (and whatever else the example starts there) runs on.
    pub serving: tokio::runtime::Runtime,
    pub server: RocketMqServer,
    pub producer: Arc<Producer>,
}

/// Open the broker, start the endpoint on a runtime whose threads are named
/// `thread_name`, and connect the official producer to it.
pub async fn serve(thread_name: &str) -> Served {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = Broker::open(BrokerConfig::new(dir.path())).expect("broker");
    broker.create_topic("bench", 4).expect("topic");
    let any = "127.0.0.1:0".parse().expect("an address");
    let serving = tokio::runtime::Builder::new_multi_thread()
        .thread_name(thread_name)
        .enable_all()
        .build()
        .expect("the serving runtime");
    let server = serving
        .spawn(RocketMqServer::start(broker.clone(), any))
        .await
        .expect("starts")
        .expect("endpoint");
    let mut popt = ProducerOption::default();
    popt.set_topics(vec!["bench"]);
    let mut copt = ClientOption::default();
    copt.set_access_url(server.local_addr().to_string());
    copt.set_timeout(Duration::from_secs(30));
    let mut producer = Producer::new(popt, copt).expect("producer");
    producer.start().await.expect("producer starts");
    Served {
        _dir: dir,
        broker,
        serving,
        server,
        producer: Arc::new(producer),
    }
}

impl Served {
    /// Stop the producer, the endpoint and the broker.
    pub async fn stop(self) {
        if let Ok(p) = Arc::try_unwrap(self.producer) {
            let _ = p.shutdown().await;
        }
        self.serving
            .spawn(self.server.shutdown(Duration::from_secs(2)))
            .await
            .expect("stops");
        self.serving.shutdown_background();
        self.broker.close().expect("close");
    }
}
