//! The filter's local view of the registry, rebuilt from each control-plane snapshot: agents by
//! token hash (with compiled model / tool globs), models and providers by name.

use std::collections::HashMap;

use aex_proto::glob::GlobSet;
use aex_proto::v1 as pb;
use sha2::{Digest, Sha256};

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
    pub fn model_allowed(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|g| g.is_match(model))
    }
    pub fn tool_allowed(&self, tool: &str) -> bool {
        self.tools.as_ref().is_none_or(|g| g.is_match(tool))
    }
}

#[derive(Default)]
pub struct Index {
    pub version: u64,
    agents: HashMap<String, AgentEntry>,
    pub models: HashMap<String, pb::Model>,
    pub providers: HashMap<String, pb::Provider>,
    pub image_token_bound: u64,
    pub message_token_overhead: u64,
    pub max_body_bytes: u64,
    /// Lease epoch of each agent, by agent id.
    epochs: HashMap<String, u64>,
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
        let agents = s
            .agents
            .into_iter()
            .map(|a| {
                let e = AgentEntry {
                    models: globs(&a.allowed_models),
                    tools: globs(&a.allowed_tools),
                    policy: a,
                };
                (e.policy.token_sha256.clone(), e)
            })
            .collect();
        Index {
            version,
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
