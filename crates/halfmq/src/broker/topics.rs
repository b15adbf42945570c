//! Topics: creation (durable in sled), lookup with creation on first use, and the queue a
//! message goes to.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::{validate_user_topic_name, Broker, Topic};
use crate::config::QUEUES_MAX;
use crate::meta::TopicConfig;
use halfmq_store::consume_queue::key_hash;
use halfmq_store::validate_topic_name;
use halfmq_types::error::{Error, Result};
use halfmq_types::{Message, TopicInfo};

impl Broker {
    /// Make sure every topic the log knows about has a configuration, and load them all.
    pub(super) fn load_topics(&self) -> Result<()> {
        let mut by_topic: BTreeMap<String, u32> = BTreeMap::new();
        for q in self.store.queues() {
            let e = by_topic.entry(q.topic().to_owned()).or_default();
            *e = (*e).max(q.queue_id() + 1);
        }
        for (name, max_queue) in by_topic {
            if self.meta.topic(&name)?.is_none() {
                // The log has messages of a topic the metadata lost: keep them reachable.
                tracing::warn!(topic = %name, "topic found in the log but not in metadata; restoring it");
                let queues = max_queue.max(self.config.default_queues);
                self.meta.create_topic(
                    &name,
                    TopicConfig {
                        queues,
                        created_ms: self.now(),
                    },
                )?;
            }
        }
        for (name, cfg) in self.meta.topics()? {
            self.install_topic(&name, cfg)?;
        }
        Ok(())
    }

    fn install_topic(&self, name: &str, cfg: TopicConfig) -> Result<Arc<Topic>> {
        let mut queues = Vec::with_capacity(cfg.queues as usize);
        for q in 0..cfg.queues {
            queues.push(self.store.queue(name, q)?);
        }
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            queues,
            round_robin: AtomicU32::new(0),
            counters: crate::metrics::TopicCounters::new(name),
        });
        self.topics.write().insert(name.to_owned(), topic.clone());
        Ok(topic)
    }

    /// Create a topic with `queues` queues. Creating an existing topic with the same number
    /// of queues is a no-op; with another number it is an error.
    pub fn create_topic(&self, name: &str, queues: u32) -> Result<TopicInfo> {
        validate_user_topic_name(name)?;
        self.create_topic_unchecked(name, queues)
    }

    /// [`Broker::create_topic`] that also takes the broker's own topic names.
    pub(super) fn create_topic_unchecked(&self, name: &str, queues: u32) -> Result<TopicInfo> {
        validate_topic_name(name)?;
        if queues == 0 || queues > QUEUES_MAX {
            return Err(Error::Invalid {
                what: "queue count",
                reason: format!("{queues} is outside 1 ..= {QUEUES_MAX}"),
            });
        }
        let cfg = self.meta.create_topic(
            name,
            TopicConfig {
                queues,
                created_ms: self.now(),
            },
        )?;
        if cfg.queues != queues {
            return Err(Error::TopicExists {
                topic: name.to_owned(),
                existing: cfg.queues,
                requested: queues,
            });
        }
        if !self.topics.read().contains_key(name) {
            self.install_topic(name, cfg)?;
        }
        Ok(TopicInfo {
            name: name.to_owned(),
            queues,
        })
    }

    /// Every topic, by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        let mut out: Vec<TopicInfo> = self
            .topics
            .read()
            .values()
            .map(|t| TopicInfo {
                name: t.name.clone(),
                queues: t.queues.len() as u32,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub(super) fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        if let Some(t) = self.topics.read().get(name) {
            return Ok(t.clone());
        }
        if !self.config.auto_create_topics {
            validate_topic_name(name)?;
            return Err(Error::UnknownTopic(name.to_owned()));
        }
        self.create_topic(name, self.config.default_queues)?;
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(name.to_owned()))
    }

    /// The queue a message goes to: by a stable hash of its message group
    /// ([`PROP_MESSAGE_GROUP`](halfmq_types::props::PROP_MESSAGE_GROUP)) when it has one, so that a message group's messages share one
    /// queue and keep their order; else by a stable hash of its key, or round robin without
    /// one.
    pub(super) fn pick_queue(topic: &Topic, msg: &Message) -> usize {
        let n = topic.queues.len() as u32;
        if let Some(g) = msg.message_group() {
            return (key_hash(g) % n) as usize;
        }
        let key = &msg.key;
        if key.is_empty() {
            (topic.round_robin.fetch_add(1, Ordering::Relaxed) % n) as usize
        } else {
            (key_hash(key) % n) as usize
        }
    }
}
