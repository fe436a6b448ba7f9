//! Glob patterns for model and tool names, shared by the control plane (which validates them
//! when a policy is written) and the filter (which matches every request against them), so
//! both read a pattern the same way.
//!
//! Syntax (globset's defaults, for names rather than paths):
//! - `*` any run of characters, `/` included (`**` is the same as `*`);
//! - `?` exactly one character;
//! - `[abc]`, `[a-z]`, `[!a-z]` or `[^a-z]` one character in (or not in) the class; a `]` or
//!   `-` first in the class is literal;
//! - `{gpt-4o,gpt-4o-mini}` alternatives, which may nest and contain any of the above; an empty
//!   one matches nothing more (`gpt-4o{,-mini}` is both names — globset would drop it);
//! - `\` makes the next character literal.
//!
//! Matching is case-sensitive and covers the whole name. Written here rather than taken from
//! `globset`: its regex engine was more than half of the Wasm filter's code, and V8 compiling
//! that code cost Envoy ~28 MB of memory.

use std::fmt;

/// Alternatives multiply out (`{a,b}{c,d}` is four sequences); a pattern may expand to at most
/// this many.
const MAX_SEQUENCES: usize = 256;
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    One,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A compiled pattern: the token sequences its alternatives expand to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    seqs: Vec<Vec<Tok>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError(String);

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GlobError {}

/// Appends a token; `**` is `*` (consecutive stars match what one does).
fn append(seq: &mut Vec<Tok>, t: &Tok) {
    if !(*t == Tok::Star && seq.last() == Some(&Tok::Star)) {
        seq.push(t.clone());
    }
}

struct Parser<'a> {
    chars: Vec<char>,
    at: usize,
    pattern: &'a str,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> GlobError {
        GlobError(format!("{what} in pattern '{}'", self.pattern))
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.at).copied();
        self.at += usize::from(c.is_some());
        c
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    /// A sequence up to the end of the pattern (or, inside braces, up to the `,` or `}` that
    /// ends this alternative), as the token sequences it expands to.
    fn sequence(&mut self, depth: usize) -> Result<Vec<Vec<Tok>>, GlobError> {
        let mut seqs: Vec<Vec<Tok>> = vec![Vec::new()];
        let push = |seqs: &mut Vec<Vec<Tok>>, t: Tok| {
            for s in seqs.iter_mut() {
                append(s, &t);
            }
        };
        while let Some(c) = self.peek() {
            match c {
                ',' | '}' if depth > 0 => return Ok(seqs),
                '}' => return Err(self.error("'}' without a matching '{'")),
                _ => {}
            }
            self.at += 1;
            match c {
                '*' => push(&mut seqs, Tok::Star),
                '?' => push(&mut seqs, Tok::One),
                '[' => {
                    let class = self.class()?;
                    push(&mut seqs, class);
                }
                '\\' => match self.next() {
                    Some(c) => push(&mut seqs, Tok::Lit(c)),
                    None => return Err(self.error("dangling '\\'")),
                },
                '{' => {
                    if depth + 1 > MAX_DEPTH {
                        return Err(self.error("alternatives nested too deeply"));
                    }
                    let alts = self.alternatives(depth + 1)?;
                    let mut out = Vec::new();
                    for s in &seqs {
                        for a in &alts {
                            if out.len() == MAX_SEQUENCES {
                                return Err(self.error("too many alternatives"));
                            }
                            let mut joined = s.clone();
                            for t in a {
                                append(&mut joined, t);
                            }
                            out.push(joined);
                        }
                    }
                    seqs = out;
                }
                c => push(&mut seqs, Tok::Lit(c)),
            }
        }
        if depth > 0 {
            return Err(self.error("'{' without a matching '}'"));
        }
        Ok(seqs)
    }

    /// After `{`: every alternative up to the matching `}`.
    fn alternatives(&mut self, depth: usize) -> Result<Vec<Vec<Tok>>, GlobError> {
        let mut alts = Vec::new();
        loop {
            for s in self.sequence(depth)? {
                if alts.len() == MAX_SEQUENCES {
                    return Err(self.error("too many alternatives"));
                }
                alts.push(s);
            }
            match self.next() {
                Some(',') => continue,
                Some('}') => return Ok(alts),
                _ => return Err(self.error("'{' without a matching '}'")),
            }
        }
    }

    /// After `[`: the class up to its closing `]`.
    fn class(&mut self) -> Result<Tok, GlobError> {
        let negated = matches!(self.peek(), Some('!' | '^'));
        if negated {
            self.at += 1;
        }
        let mut ranges: Vec<(char, char)> = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.next() else {
                return Err(self.error("'[' without a matching ']'"));
            };
            match c {
                ']' if !first => break,
                '[' if self.peek() == Some(':') => {
                    return Err(self.error("POSIX classes like [[:alpha:]] are not supported"))
                }
                '-' if !first && self.peek().is_some_and(|n| n != ']') => {
                    let Some(hi) = self.next() else {
                        return Err(self.error("'[' without a matching ']'"));
                    };
                    let hi = if hi == '\\' {
                        self.next().ok_or_else(|| self.error("dangling '\\'"))?
                    } else {
                        hi
                    };
                    let Some(last) = ranges.last_mut() else {
                        return Err(self.error("bad range"));
                    };
                    if hi < last.0 {
                        return Err(self.error(&format!("invalid range {}-{hi}", last.0)));
                    }
                    last.1 = hi;
                }
                '\\' => {
                    let c = self.next().ok_or_else(|| self.error("dangling '\\'"))?;
                    ranges.push((c, c));
                }
                c => ranges.push((c, c)),
            }
            first = false;
        }
        Ok(Tok::Class { negated, ranges })
    }
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let mut p = Parser {
            chars: pattern.chars().collect(),
            at: 0,
            pattern,
        };
        let seqs = p.sequence(0)?;
        Ok(Glob { seqs })
    }

    /// Whether the whole of `name` matches the pattern.
    pub fn is_match(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        self.seqs.iter().any(|s| matches(s, &name))
    }
}

/// Any of several patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobSet {
    globs: Vec<Glob>,
}

impl GlobSet {
    /// Compiles every pattern; one that does not compile matches nothing.
    pub fn lenient(patterns: &[String]) -> GlobSet {
        GlobSet {
            globs: patterns.iter().filter_map(|p| Glob::new(p).ok()).collect(),
        }
    }

    pub fn is_match(&self, name: &str) -> bool {
        self.globs.iter().any(|g| g.is_match(name))
    }
}

fn one(t: &Tok, c: char) -> bool {
    match t {
        Tok::Lit(l) => *l == c,
        Tok::One => true,
        Tok::Class { negated, ranges } => {
            ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
        }
        Tok::Star => false,
    }
}

/// Wildcard matching with one backtrack point (the last `*` seen): O(len(toks) × len(name)).
fn matches(toks: &[Tok], name: &[char]) -> bool {
    let (mut t, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match (toks.get(t), name.get(n)) {
            (Some(Tok::Star), _) => {
                star = Some((t, n));
                t += 1;
            }
            (Some(tok), Some(&c)) if one(tok, c) => {
                t += 1;
                n += 1;
            }
            _ => match star {
                // Let the last star take one more character and retry.
                Some((st, sn)) => {
                    t = st + 1;
                    n = sn + 1;
                    star = Some((st, sn + 1));
                }
                None => return false,
            },
        }
    }
    toks.get(t..)
        .is_some_and(|rest| rest.iter().all(|x| *x == Tok::Star))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, name: &str) -> bool {
        Glob::new(p).unwrap().is_match(name)
    }

    #[test]
    fn wildcards_classes_alternatives_and_escapes() {
        assert!(m("gpt-4o", "gpt-4o"));
        assert!(!m("gpt-4o", "gpt-4o-mini"), "the whole name");
        assert!(m("gpt-4o*", "gpt-4o-mini"));
        assert!(m("gpt-4o*", "gpt-4o"));
        assert!(m("*", ""));
        assert!(m("*mini*", "openai/gpt-4o-mini-2024"), "* crosses '/'");
        assert!(m("**", "a/b/c"));
        assert!(m("gpt-?o", "gpt-4o"));
        assert!(!m("gpt-?o", "gpt-o"));
        assert!(m("claude-3-[a-z]*", "claude-3-opus"));
        assert!(!m("claude-3-[!a-z]*", "claude-3-opus"));
        assert!(m("claude-3-[^a-z]*", "claude-3-5-sonnet"));
        assert!(m("[]x]", "]") && m("[-x]", "-") && m("[a-]", "-"));
        assert!(m("{gpt-4o,gpt-4o-mini}", "gpt-4o-mini"));
        assert!(!m("{gpt-4o,gpt-4o-mini}", "gpt-4o-nano"));
        assert!(m("{a,{b,c}*}x", "cdx"));
        assert!(m("x{,y}", "x") && m("x{,y}", "xy"));
        assert!(m("a,b", "a,b"), "a comma outside braces is literal");
        assert!(m(r"what\*", "what*") && !m(r"what\*", "whatever"));
        assert!(m("*a*b*c*", "xxaxxbxxcxx") && !m("*a*b*c*", "xxcxxbxxa"));
        assert!(m("é*", "école") && m("?", "é"), "characters, not bytes");
        assert!(!m("Gpt-4o", "gpt-4o"), "case-sensitive");
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        for (p, why) in [
            ("gpt-[4", "without a matching ']'"),
            ("{a,b", "without a matching '}'"),
            ("a}", "without a matching '{'"),
            ("x\\", "dangling"),
            ("[z-a]", "invalid range"),
            ("[[:alpha:]]", "POSIX"),
            ("{a,b}{c,d}{e,f}{g,h}{i,j}{k,l}{m,n}{o,p}{q,r}", "too many"),
        ] {
            let e = Glob::new(p).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(p), "{p}: {e}");
        }
        let deep = "{".repeat(40) + &"}".repeat(40);
        assert!(Glob::new(&deep).is_err());
    }

    #[test]
    fn a_set_matches_any_of_its_patterns_and_skips_bad_ones() {
        let s = GlobSet::lenient(&["gpt-4o*".into(), "[bad".into(), "claude-*".into()]);
        assert!(s.is_match("gpt-4o-mini") && s.is_match("claude-3-opus"));
        assert!(!s.is_match("[bad") && !s.is_match("llama"));
        assert!(!GlobSet::default().is_match("x"));
    }

    #[test]
    fn long_names_against_many_stars_stay_linear() {
        let name = "a".repeat(20_000);
        let g = Glob::new("*a*a*a*a*a*a*a*a*b").unwrap();
        let t = std::time::Instant::now();
        assert!(!g.is_match(&name));
        assert!(t.elapsed().as_millis() < 2_000);
    }
}
