//! The filter's local view of the registry, rebuilt from each control-plane snapshot: agents by
//! token hash (with compiled model / tool globs), models and providers by name.

use std::collections::HashMap;

use aex_proto::glob::GlobSet;
use aex_proto::v1 as pb;
use sha2::{Digest, Sha256};

#[derive(Clone)]
pub struct AgentEntry {
    pub policy: pb::AgentPolicy,
    /// None = every priced model.
    models: Option<GlobSet>,
    /// None = any tool name.
    tools: Option<GlobSet>,
}

fn globs(patterns: &[String]) -> Option<GlobSet> {
    // The control plane validates patterns; a bad one here matches nothing (fail closed).
    (!patterns.is_empty()).then(|| GlobSet::lenient(patterns))
}

impl AgentEntry {
    fn new(policy: pb::AgentPolicy) -> Self {
        AgentEntry {
            models: globs(&policy.allowed_models),
            tools: globs(&policy.allowed_tools),
            policy,
        }
    }

    pub fn model_allowed(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|g| g.is_match(model))
    }
    pub fn tool_allowed(&self, tool: &str) -> bool {
        self.tools.as_ref().is_none_or(|g| g.is_match(tool))
    }
}

#[derive(Default, Clone)]
pub struct Index {
    pub version: u64,
    /// The control-plane run `version` belongs to (a delta applies only within one run).
    pub instance: u64,
    agents: HashMap<String, AgentEntry>,
    pub models: HashMap<String, pb::Model>,
    pub providers: HashMap<String, pb::Provider>,
    pub image_token_bound: u64,
    pub message_token_overhead: u64,
    pub max_body_bytes: u64,
    /// Lease epoch of each agent, by agent id.
    epochs: HashMap<String, u64>,
    /// Token hash of each agent, by agent id (a delta names agents by id).
    hashes: HashMap<String, String>,
}

pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Index {
    pub fn from_snapshot(version: u64, s: pb::Snapshot) -> Self {
        let epochs = s
            .agents
            .iter()
            .map(|a| (a.agent_id.clone(), a.lease_epoch))
            .collect();
        let hashes = s
            .agents
            .iter()
            .map(|a| (a.agent_id.clone(), a.token_sha256.clone()))
            .collect();
        let agents = s
            .agents
            .into_iter()
            .map(|a| (a.token_sha256.clone(), AgentEntry::new(a)))
            .collect();
        Index {
            version,
            instance: 0,
            hashes,
            agents,
            models: s.models.into_iter().map(|m| (m.name.clone(), m)).collect(),
            providers: s
                .providers
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            image_token_bound: s.image_token_bound,
            message_token_overhead: s.message_token_overhead,
            max_body_bytes: s.max_body_bytes,
            epochs,
        }
    }

    /// Brings the index from `d.base_version` to `version`: agents created or changed replace
    /// what it held of them (a rotated token's old hash goes), deleted ones go.
    pub fn apply_delta(&mut self, version: u64, d: pb::SyncDelta) {
        for id in &d.deleted_agent_ids {
            self.remove_agent(id);
        }
        for a in d.agents {
            self.remove_agent(&a.agent_id);
            self.epochs.insert(a.agent_id.clone(), a.lease_epoch);
            self.hashes
                .insert(a.agent_id.clone(), a.token_sha256.clone());
            self.agents
                .insert(a.token_sha256.clone(), AgentEntry::new(a));
        }
        self.version = version;
    }

    /// Whether a delta from `base` to `version` of control-plane run `instance` brings this index
    /// up to date. It holds every change after `base`, each agent as it is at `version`, so it
    /// also applies over a newer base of the same run (two syncs in flight, the later answered
    /// first); never over a version newer than its own, whose agents it would turn back.
    pub fn takes_delta(&self, instance: u64, base: u64, version: u64) -> bool {
        self.instance == instance && base <= self.version && self.version <= version
    }

    fn remove_agent(&mut self, id: &str) {
        if let Some(hash) = self.hashes.remove(id) {
            self.agents.remove(&hash);
        }
        self.epochs.remove(id);
    }

    /// The agent holding this token hash. The map lookup is on a SHA-256 of the secret, so its
    /// timing reveals nothing usable; the final comparison is constant-time anyway.
    pub fn agent_by_token_hash(&self, hash: &str) -> Option<&AgentEntry> {
        let e = self.agents.get(hash)?;
        let a = e.policy.token_sha256.as_bytes();
        let b = hash.as_bytes();
        let same =
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        same.then_some(e)
    }

    /// The agent's lease epoch; `None` once the agent is gone.
    pub fn lease_epoch(&self, agent_id: &str) -> Option<u64> {
        self.epochs.get(agent_id).copied()
    }

    /// Models this agent may call: allowed by its policy and priced, sorted by name.
    pub fn visible_models(&self, agent: &AgentEntry) -> Vec<&pb::Model> {
        let mut v: Vec<&pb::Model> = self
            .models
            .values()
            .filter(|m| m.priced && agent.model_allowed(&m.name))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// A priced model's prices, as the control plane charges them.
pub fn prices(m: &pb::Model) -> Option<aex_proto::money::Prices> {
    m.priced.then_some(aex_proto::money::Prices {
        input: m.input_micros_per_1m,
        output: m.output_micros_per_1m,
        cached_input: m.cached_input_micros_per_1m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, hash: &str, epoch: u64, models: &[&str]) -> pb::AgentPolicy {
        pb::AgentPolicy {
            agent_id: id.into(),
            name: id.into(),
            token_sha256: hash.into(),
            lease_epoch: epoch,
            allowed_models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    fn snapshot(agents: Vec<pb::AgentPolicy>) -> pb::Snapshot {
        pb::Snapshot {
            agents,
            models: vec![pb::Model {
                name: "m".into(),
                priced: true,
                ..Default::default()
            }],
            max_body_bytes: 7,
            ..Default::default()
        }
    }

    /// Everything a request can learn from the index about these agents and tokens.
    fn view(i: &Index, ids: &[&str], hashes: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = hashes
            .iter()
            .map(|h| match i.agent_by_token_hash(h) {
                Some(a) => format!(
                    "{h}: {} m={} x={}",
                    a.policy.agent_id,
                    a.model_allowed("m"),
                    a.model_allowed("x")
                ),
                None => format!("{h}: none"),
            })
            .collect();
        v.extend(
            ids.iter()
                .map(|id| format!("{id}: epoch {:?}", i.lease_epoch(id))),
        );
        v.push(format!(
            "version {} models {} max {}",
            i.version,
            i.models.len(),
            i.max_body_bytes
        ));
        v
    }

    #[test]
    fn a_delta_brings_the_index_where_the_snapshot_would() {
        let before = snapshot(vec![
            agent("a", "ha", 1, &[]),
            agent("b", "hb", 1, &[]),
            agent("c", "hc", 1, &["m"]),
        ]);
        let mut index = Index::from_snapshot(10, before);
        // b's token rotated (new hash, new epoch), c's policy narrowed, a deleted, d created.
        let delta = pb::SyncDelta {
            base_version: 10,
            agents: vec![
                agent("b", "hb2", 2, &[]),
                agent("c", "hc", 2, &["x"]),
                agent("d", "hd", 1, &[]),
            ],
            deleted_agent_ids: vec!["a".into(), "gone-long-ago".into()],
        };
        index.apply_delta(14, delta);
        let after = Index::from_snapshot(
            14,
            snapshot(vec![
                agent("b", "hb2", 2, &[]),
                agent("c", "hc", 2, &["x"]),
                agent("d", "hd", 1, &[]),
            ]),
        );
        let ids = ["a", "b", "c", "d"];
        let hashes = ["ha", "hb", "hb2", "hc", "hd"];
        assert_eq!(view(&index, &ids, &hashes), view(&after, &ids, &hashes));
        // The old token is refused, the deleted agent's lease epoch is gone.
        assert!(index.agent_by_token_hash("hb").is_none());
        assert!(index.agent_by_token_hash("ha").is_none());
        assert_eq!(index.lease_epoch("a"), None);
    }

    #[test]
    fn a_delta_applies_over_its_base_or_a_newer_one_of_its_run_never_an_older_or_later() {
        let mut index = Index::from_snapshot(10, snapshot(vec![agent("a", "ha", 1, &[])]));
        index.instance = 7;
        assert!(index.takes_delta(7, 10, 12));
        assert!(
            index.takes_delta(7, 8, 12),
            "covers every change after 10 too"
        );
        assert!(!index.takes_delta(7, 11, 12), "would miss the change at 11");
        assert!(
            !index.takes_delta(7, 8, 9),
            "older than what is held: would turn it back"
        );
        assert!(!index.takes_delta(8, 10, 12), "another run's versions");
        // Two syncs from 10 in flight; the one answered at 14 lands first, then the one at 12.
        let d12 = pb::SyncDelta {
            base_version: 10,
            agents: vec![agent("a", "ha2", 2, &[])],
            deleted_agent_ids: vec![],
        };
        let d14 = pb::SyncDelta {
            base_version: 10,
            agents: vec![agent("a", "ha3", 3, &[]), agent("b", "hb", 1, &[])],
            deleted_agent_ids: vec![],
        };
        assert!(index.takes_delta(7, d14.base_version, 14));
        index.apply_delta(14, d14);
        assert!(!index.takes_delta(7, d12.base_version, 12));
        assert!(
            index.agent_by_token_hash("ha3").is_some() && index.agent_by_token_hash("hb").is_some()
        );
    }
}
