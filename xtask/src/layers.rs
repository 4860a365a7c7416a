//! The layering lint `cargo xtask test` runs on `proxy/src`: dependencies between modules point
//! one way. Within every directory (the crate root included), the modules that are siblings
//! there must not import each other in a circle, judged by the `crate::` and `super::` paths in
//! their code (unit-test modules excluded: a test may reach up to build what it needs).
//!
//! A path counts as a dependency of its file's module on the sibling module it leads into:
//! `use crate::relay::tunnel::Carrier;` in `relay/edge/tls.rs` makes `edge` depend on `tunnel`
//! inside `relay`. Paths into a module's own parent (its `mod.rs` items) or its own children
//! are not sibling dependencies.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// One sibling dependency and where it was seen.
#[derive(Debug, Clone)]
struct Edge {
    to: String,
    /// `file:line: path` of the first occurrence.
    evidence: String,
}

/// Directory (module path, `""` for the crate root) -> module -> its sibling dependencies.
type Graph = BTreeMap<String, BTreeMap<String, BTreeMap<String, Edge>>>;

/// Checks `src` (a crate's `src/` with `lib.rs`); the error lists every cycle with evidence.
pub fn check(src: &Path) -> Result<String> {
    let files = rust_files(src)?;
    let modules: BTreeSet<Vec<String>> = files.iter().filter_map(|f| module_path(src, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let Some(module) = module_path(src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let relative = file.strip_prefix(src).unwrap_or(file).display().to_string();
        for (line, path) in paths(&without_tests(&text)) {
            let Some(target) = resolve(&module, &path) else {
                continue;
            };
            let common = module.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common >= module.len() || common >= target.len() {
                continue; // into its own subtree or to an ancestor
            }
            let parent = &module[..common];
            let sibling: Vec<String> = parent.iter().cloned().chain([target[common].clone()]).collect();
            if !modules.contains(&sibling) {
                continue; // an item of the parent module, not a sibling module
            }
            graph
                .entry(parent.join("::"))
                .or_default()
                .entry(module[common].clone())
                .or_default()
                .entry(target[common].clone())
                .or_insert_with(|| Edge {
                    to: target[common].clone(),
                    evidence: format!("{relative}:{line}: {}", path.join("::")),
                });
        }
    }
    let mut report = String::new();
    let mut directories = 0;
    for (dir, deps) in &graph {
        directories += 1;
        for cycle in cycles(deps) {
            let place = if dir.is_empty() { "the crate root" } else { dir };
            let _ = writeln!(
                report,
                "import cycle among the modules of {place}: {}",
                cycle.join(" -> ")
            );
            for pair in cycle.windows(2) {
                let edge = &deps[&pair[0]][&pair[1]];
                let _ = writeln!(report, "    {} -> {}: {}", pair[0], edge.to, edge.evidence);
            }
        }
    }
    if !report.is_empty() {
        bail!("{report}dependencies must point one way (see docs/architecture.md)");
    }
    Ok(format!(
        "no import cycle among the modules of {} ({} files, {directories} directories with sibling imports)",
        src.display(),
        files.len()
    ))
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The module a file defines (`relay/edge/tls.rs` -> `[relay, edge, tls]`, `lib.rs` -> `[]`);
/// `None` for the binary's `main.rs`.
fn module_path(src: &Path, file: &Path) -> Option<Vec<String>> {
    let relative = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    match last.as_str() {
        "lib.rs" | "mod.rs" => {}
        "main.rs" if parts.is_empty() => return None,
        name => parts.push(name.strip_suffix(".rs")?.to_owned()),
    }
    Some(parts)
}

/// The file without its unit-test module(s) and comments.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim_start() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            // A test module runs to the end of the file in this code base; stop counting here,
            // but keep line numbers right for anything before it.
            break;
        }
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every `crate::...` / `super::...` path in `code`, with its line number, use-tree braces
/// expanded.
fn paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let tail = &bytes[at..];
        let starts = tail.starts_with(b"crate::") || tail.starts_with(b"super::");
        let boundary = at == 0 || (!is_ident(bytes[at - 1]) && bytes[at - 1] != b':');
        if starts && boundary {
            // An ASCII match: `at` is a char boundary.
            let line = code[..at].matches('\n').count() + 1;
            let (trees, used) = parse_tree(&code[at..]);
            for tree in trees {
                out.push((line, tree));
            }
            at += used.max(1);
        } else {
            at += 1;
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Parses a path tree at the start of `s` (`a::b::{c, d::e}`): its expanded paths and the bytes
/// it used.
fn parse_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let bytes = s.as_bytes();
    let mut prefix = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            let mut expanded = Vec::new();
            loop {
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    i += 1;
                    break;
                }
                let (trees, used) = parse_tree(&s[i..]);
                if used == 0 {
                    i += 1;
                    continue;
                }
                i += used;
                for tree in trees {
                    expanded.push(prefix.iter().cloned().chain(tree).collect());
                }
            }
            return (expanded, i);
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if i == start {
            // `*` or the end of the path.
            if i < bytes.len() && bytes[i] == b'*' {
                i += 1;
            }
            return (vec![prefix], i);
        }
        prefix.push(s[start..i].to_owned());
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The module path `path` (written in `module`) leads to, from the crate root.
fn resolve(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut segments = path.iter().peekable();
    let mut base: Vec<String> = match segments.next()?.as_str() {
        "crate" => Vec::new(),
        "super" => {
            let mut base = module.to_vec();
            base.pop()?;
            while segments.peek().is_some_and(|s| *s == "super") {
                segments.next();
                base.pop()?;
            }
            base
        }
        _ => return None,
    };
    base.extend(segments.filter(|s| *s != "self").cloned());
    Some(base)
}

/// The elementary cycles worth reporting: one per strongly connected component, as a path that
/// starts and ends at the same module.
fn cycles(deps: &BTreeMap<String, BTreeMap<String, Edge>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for start in deps.keys() {
        if reported.contains(start) {
            continue;
        }
        // Shortest path from `start` back to itself (breadth first).
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.as_str()]);
        let mut closed = false;
        'search: while let Some(node) = queue.pop_front() {
            for next in deps.get(node).into_iter().flat_map(|d| d.keys()) {
                if next == start {
                    previous.insert(start.as_str(), node);
                    closed = true;
                    break 'search;
                }
                if !previous.contains_key(next.as_str()) {
                    previous.insert(next.as_str(), node);
                    queue.push_back(next.as_str());
                }
            }
        }
        if closed {
            let mut cycle = vec![start.clone()];
            let mut node = previous[start.as_str()];
            while node != start {
                cycle.push(node.to_owned());
                node = previous[node];
            }
            cycle.push(start.clone());
            cycle.reverse();
            reported.extend(cycle.iter().cloned());
            found.push(cycle);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn one_way_dependencies_pass() {
        let dir = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
            ("a.rs", "use crate::b::{x, y::z};\nfn f() { crate::c::g(); }\n"),
            ("b/mod.rs", "pub mod y;\nuse super::c::X;\n"),
            ("b/y.rs", "use super::super::c;\nuse super::Item;\n"),
            ("c.rs", "//! Nothing: see [`crate::a`].\n"),
        ]);
        check(dir.path()).unwrap();
    }

    #[test]
    fn a_cycle_is_named_with_its_evidence() {
        let dir = tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
            ("a.rs", "use crate::b::X;\n"),
            ("b.rs", "use crate::{c::{Y, Z}, d};\n"),
            ("c.rs", "fn f() { let _ = super::a::X; }\n"),
        ]);
        let error = check(dir.path()).unwrap_err().to_string();
        assert!(error.contains("the crate root: a -> b -> c -> a"), "{error}");
        assert!(error.contains("c.rs:1: super::a::X"), "{error}");
    }

    #[test]
    fn cycles_inside_a_directory_count_and_tests_do_not() {
        let dir = tree(&[
            ("lib.rs", "pub mod agent;\n"),
            ("agent/mod.rs", "pub mod data;\npub mod link;\nuse link::Thing;\n"),
            ("agent/data.rs", "use super::link::Dialer;\n"),
            (
                "agent/link.rs",
                "use super::Shared;\n#[cfg(test)]\nmod tests {\n    use crate::agent::data::X;\n}\n",
            ),
        ]);
        check(dir.path()).unwrap();
        let dir = tree(&[
            ("lib.rs", "pub mod agent;\n"),
            ("agent/mod.rs", "pub mod data;\npub mod link;\n"),
            ("agent/data.rs", "use super::link::Dialer;\n"),
            ("agent/link.rs", "use crate::agent::data::DataContext;\n"),
        ]);
        let error = check(dir.path()).unwrap_err().to_string();
        assert!(error.contains("agent: data -> link -> data"), "{error}");
    }

    #[test]
    fn the_real_tree_has_no_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/src");
        check(&src).unwrap();
    }
}
