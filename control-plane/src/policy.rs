//! An agent's capability policy as the daemon stores it, and its conversion to the wire types.

use aex_proto::glob::Glob;
use aex_proto::v1 as pb;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Model endpoints (and listing models).
    #[default]
    Execution,
    /// `GET /v1/models` and `GET /v1/aex/usage` only.
    ReadOnly,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "execution" => Ok(Scope::Execution),
            "read-only" | "readonly" | "read_only" => Ok(Scope::ReadOnly),
            other => Err(format!(
                "unknown scope '{other}' (expected execution or read-only)"
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Execution => "execution",
            Scope::ReadOnly => "read-only",
        }
    }
    pub fn to_pb(self) -> pb::Scope {
        match self {
            Scope::Execution => pb::Scope::Execution,
            Scope::ReadOnly => pb::Scope::ReadOnly,
        }
    }
    pub fn from_pb(s: i32) -> Self {
        match pb::Scope::try_from(s) {
            Ok(pb::Scope::ReadOnly) => Scope::ReadOnly,
            _ => Scope::Execution,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Exact names or globs; empty = every priced model.
    pub allowed_models: Vec<String>,
    pub allow_streaming: bool,
    pub allow_tools: bool,
    /// Empty = any tool name.
    pub allowed_tools: Vec<String>,
    pub allow_vision: bool,
    pub allow_passthrough: bool,
    pub strict: bool,
    /// 0 = the model's limit only.
    pub max_output_tokens: u64,
    pub scope: Scope,
    /// Tokens per minute (input + output, sliding window); 0 = no limit. Absent in policies
    /// stored before it existed.
    #[serde(default)]
    pub tpm: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_models: Vec::new(),
            allow_streaming: true,
            allow_tools: true,
            allowed_tools: Vec::new(),
            allow_vision: true,
            allow_passthrough: false,
            strict: false,
            max_output_tokens: 0,
            scope: Scope::Execution,
            tpm: 0,
        }
    }
}

/// Splits a comma-separated CLI list; "" and "*" mean "no restriction". Commas inside a glob's
/// `{a,b}` alternatives (or escaped as `\,`) belong to that pattern.
pub fn parse_list(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let (mut depth, mut escaped, mut start) = (0usize, false, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    let items: Vec<String> = items
        .into_iter()
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect();
    if items.iter().any(|x| x == "*") {
        Vec::new()
    } else {
        items
    }
}

impl Policy {
    pub fn to_pb(&self) -> pb::PolicyFields {
        pb::PolicyFields {
            allowed_models: self.allowed_models.clone(),
            allow_streaming: self.allow_streaming,
            allow_tools: self.allow_tools,
            allowed_tools: self.allowed_tools.clone(),
            allow_vision: self.allow_vision,
            allow_passthrough: self.allow_passthrough,
            strict: self.strict,
            max_output_tokens: self.max_output_tokens,
            scope: self.scope.to_pb() as i32,
            tpm: self.tpm,
        }
    }

    pub fn from_pb(p: &pb::PolicyFields) -> Self {
        Self {
            allowed_models: p.allowed_models.clone(),
            allow_streaming: p.allow_streaming,
            allow_tools: p.allow_tools,
            allowed_tools: p.allowed_tools.clone(),
            allow_vision: p.allow_vision,
            allow_passthrough: p.allow_passthrough,
            strict: p.strict,
            max_output_tokens: p.max_output_tokens,
            scope: Scope::from_pb(p.scope),
            tpm: p.tpm,
        }
    }

    /// Validates globs so a bad pattern is refused at the CLI, not silently ignored by the filter.
    pub fn validate(&self) -> Result<(), String> {
        for m in &self.allowed_models {
            Glob::new(m).map_err(|e| format!("bad model pattern: {e}"))?;
        }
        for t in &self.allowed_tools {
            Glob::new(t).map_err(|e| format!("bad tool pattern: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_commas_inside_alternatives_belong_to_the_pattern() {
        assert_eq!(parse_list("gpt-4o, llama-*"), ["gpt-4o", "llama-*"]);
        assert_eq!(parse_list("{gpt-4o,gpt-4o-mini}"), ["{gpt-4o,gpt-4o-mini}"]);
        assert_eq!(
            parse_list("gpt-{4o-mini,oss-20b},claude-*"),
            ["gpt-{4o-mini,oss-20b}", "claude-*"]
        );
        assert_eq!(parse_list(r"a\,b,c"), [r"a\,b", "c"]);
        assert_eq!(parse_list(" , *"), Vec::<String>::new());
        assert_eq!(parse_list(""), Vec::<String>::new());
        // An unbalanced brace is kept whole for the glob parser to refuse with its message.
        assert_eq!(parse_list("{a,b"), ["{a,b"]);
    }
}
