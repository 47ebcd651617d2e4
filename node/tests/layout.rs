//! The node's modules form no import cycle: each folder (and each file in
//! it) imports only modules below it, so that a part can be read, tested
//! and changed with only what it names (ARCHITECTURE.md, "Layers").
//!
//! Read from the sources: every `crate::a::b` path and `use crate::{..}`
//! group outside `#[cfg(test)]` modules is an edge to the longest module it
//! names, `super::x` one to the sibling or parent, and the re-exports in
//! `lib.rs` (`crate::config` is `daemon::config`) are followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            // Unit tests may reach anywhere.
            let text = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            out.insert(name, text);
        }
    }
    out
}

/// `pub use a::{b, c};` and `pub use a::b;` in lib.rs: alias -> module.
fn aliases(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lib.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("pub use ").and_then(|r| r.strip_suffix(';')) else {
            continue;
        };
        match rest.split_once("::{") {
            Some((base, names)) => {
                for n in names.trim_end_matches('}').split(',').map(str::trim) {
                    out.insert(n.to_string(), format!("{base}::{n}"));
                }
            }
            None => {
                if let Some((_, n)) = rest.rsplit_once("::") {
                    out.insert(n.to_string(), rest.to_string());
                }
            }
        }
    }
    out
}

/// A path's segments, starting at `at` in `text` (letters, digits, `_`, `::`).
fn path_at(text: &str, at: usize) -> Vec<String> {
    let tail = &text[at..];
    let end = tail
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(tail.len());
    tail[..end]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn resolve(mods: &BTreeMap<String, String>, aliases: &BTreeMap<String, String>, path: &[String]) -> Option<String> {
    let mut parts = path.to_vec();
    if let Some(first) = parts.first()
        && let Some(a) = aliases.get(first)
    {
        let mut v: Vec<String> = a.split("::").map(str::to_string).collect();
        v.extend(parts.drain(1..));
        parts = v;
    }
    (1..=parts.len())
        .rev()
        .map(|i| parts[..i].join("::"))
        .find(|m| mods.contains_key(m))
}

/// The paths named at `at`: one path, or each item of a `{..}` group.
fn paths_at(text: &str, at: usize) -> Vec<Vec<String>> {
    if !text[at..].starts_with('{') {
        return vec![path_at(text, at)];
    }
    let close = text[at..].find('}').map_or(text.len(), |c| at + c);
    text[at + 1..close]
        .split(',')
        .map(|item| {
            let item = item.trim().split("::{").next().unwrap_or("");
            item.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect()
        })
        .collect()
}

fn edges(mods: &BTreeMap<String, String>, aliases: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (name, text) in mods {
        let mut named = Vec::new();
        for (i, _) in text.match_indices("crate::") {
            named.extend(paths_at(text, i + "crate::".len()));
        }
        let parent: Vec<String> = name.split("::").map(str::to_string).collect();
        let parent = &parent[..parent.len() - 1];
        for (i, _) in text.match_indices("super::") {
            for p in paths_at(text, i + "super::".len()) {
                named.push(parent.iter().cloned().chain(p).collect());
            }
        }
        let deps = named
            .iter()
            .filter_map(|p| resolve(mods, aliases, p))
            .filter(|m| m != name)
            .collect();
        out.insert(name.clone(), deps);
    }
    out
}

/// A cycle through `start`, if any: the path back to it.
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                let mut p = path.clone();
                p.push(start.to_string());
                return Some(p);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn no_module_of_the_node_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let aliases = aliases(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let edges = edges(&mods, &aliases);
    // The reader sees what it must: the daemon composes the worker's and
    // the client's sides, and those do not reach back into it.
    assert!(edges["daemon"].contains("task::executor") && edges["daemon"].contains("job::runner"));
    assert!(edges["job"].contains("net::fetch"));
    let cycles: Vec<String> = mods
        .keys()
        .filter_map(|m| cycle_from(&edges, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let e: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(cycle_from(&e, "a").unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(cycle_from(&e, "d"), None);
}
