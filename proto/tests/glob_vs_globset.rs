//! Differential check: `aex_proto::glob` reads patterns as globset (the reference for the syntax
//! AEX documents) does, on thousands of generated patterns and names. Excluded by construction:
//! `**` next to `/` (globset's path-recursive meaning; AEX reads `**` as `*`) and POSIX classes
//! (refused by AEX), and empty alternatives (`x{,y}` matches `x` and `xy` here; globset drops the
//! empty branch and matches only `xy`).

use aex_proto::glob::Glob;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "a",
    "b",
    "-",
    "/",
    ".",
    "*",
    "?",
    "[ab]",
    "[!a]",
    "[a-c]",
    "[^b-]",
    "{a,b*}",
    "{a,-}",
    "{a{b,c},?}",
    "\\*",
    "\\?",
    ",",
];
const CHARS: &[char] = &['a', 'b', 'c', '-', '/', '.', '*', '?', ','];

#[test]
fn matches_like_globset_on_generated_patterns() {
    let mut rng = Lcg(7);
    let (mut compared, mut matched) = (0, 0);
    for _ in 0..4_000 {
        let pattern: String = (0..1 + rng.next(6))
            .map(|_| PIECES[rng.next(PIECES.len())])
            .collect();
        if pattern.contains("**") {
            continue;
        }
        let ours = Glob::new(&pattern).expect(&pattern);
        let reference = globset::Glob::new(&pattern)
            .expect(&pattern)
            .compile_matcher();
        for _ in 0..40 {
            let name: String = (0..rng.next(8))
                .map(|_| CHARS[rng.next(CHARS.len())])
                .collect();
            let want = reference.is_match(&name);
            assert_eq!(
                ours.is_match(&name),
                want,
                "pattern {pattern:?} name {name:?}"
            );
            compared += 1;
            matched += usize::from(want);
        }
    }
    // The corpus exercises both outcomes.
    assert!(
        compared > 100_000 && matched > 3_000,
        "{compared} {matched}"
    );
}

#[test]
fn refuses_what_globset_refuses() {
    for p in ["a[", "{a", "a}", "x\\", "[z-a]"] {
        assert!(globset::Glob::new(p).is_err(), "{p}");
        assert!(Glob::new(p).is_err(), "{p}");
    }
}
