//! librdkafka's mock cluster, for fault injection only (request errors, a broker down): every
//! behaviour that matters is also proven on Apache Kafka.

use std::sync::mpsc::{channel, Sender};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// A fault to inject.
pub enum MockCmd {
    /// The next `n` requests of this API fail with this error.
    RequestErrors(RDKafkaApiKey, RDKafkaRespErr, usize),
    BrokerDown,
    BrokerUp,
    /// Every response of the broker is delayed this long (a distant broker).
    RoundTrip(std::time::Duration),
}

/// Runs a one-broker mock cluster on its own thread (it is not Send) with `topics`; returns its
/// bootstrap address and a command channel. The cluster lives until the sender is dropped.
pub fn mock_cluster(topics: &[(&str, i32)]) -> (String, Sender<MockCmd>) {
    let topics: Vec<(String, i32)> = topics.iter().map(|(t, p)| (t.to_string(), *p)).collect();
    let (addr_tx, addr_rx) = channel();
    let (cmd_tx, cmd_rx) = channel::<MockCmd>();
    std::thread::spawn(move || {
        let c = MockCluster::new(1).expect("librdkafka mock cluster");
        for (t, p) in &topics {
            c.create_topic(t, *p, 1).expect("mock topic");
        }
        addr_tx.send(c.bootstrap_servers()).unwrap();
        while let Ok(cmd) = cmd_rx.recv() {
            match cmd {
                MockCmd::RequestErrors(api, err, n) => c.request_errors(api, &vec![err; n]),
                MockCmd::BrokerDown => c.broker_down(1).expect("broker down"),
                MockCmd::BrokerUp => c.broker_up(1).expect("broker up"),
                MockCmd::RoundTrip(rtt) => c.broker_round_trip_time(1, rtt).expect("rtt"),
            }
        }
    });
    (addr_rx.recv().unwrap(), cmd_tx)
}

/// The offset `group` committed for `topic`/`partition` on the mock cluster (-1 if none).
pub fn committed_offset(bootstrap: &str, group: &str, topic: &str, partition: i32) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("consumer on the mock cluster");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    c.committed_offsets(tpl, std::time::Duration::from_secs(5))
        .expect("committed offsets from the mock cluster")
        .elements()[0]
        .offset()
        .to_raw()
        .unwrap_or(-1)
}
