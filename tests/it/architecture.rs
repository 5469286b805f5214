//! The layering that `src/lib.rs` describes, checked: modules under `src/` use only modules of
//! their own layer or the layers below, and never in a cycle. Also: nothing in the repository
//! points at files outside it (a fresh clone must explain itself).
//!
//! Run alone with `cargo test --test it architecture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers of `src/lib.rs`, lowest first. A module may use any module of a lower layer, and
/// one of its own layer as long as no cycle forms.
const LAYERS: &[&[&str]] = &[
    &["config", "secret", "tls", "http"],
    &["db"],
    &["schema"],
    &["outbox"],
    &["mapping", "keap", "ratelimit", "metrics", "token", "systemd", "hooks"],
    &["access", "mirror", "deliver", "catalog"],
    &["daemon", "backfill", "failures", "status", "preview", "reconcile", "doctor", "init"],
    &["cli"],
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn layer_of(module: &str) -> usize {
    LAYERS.iter().position(|layer| layer.contains(&module)).unwrap_or_else(|| {
        panic!("src/{module} is in no layer: add it to src/lib.rs's list and to LAYERS here")
    })
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level module a file under `src/` belongs to (`src/cli/auth.rs` → `cli`).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// The top-level modules a source text names through `crate::` (`crate::a::b`, `use crate::{a, b::c}`).
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (at, _) in text.match_indices("crate::") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `keap_sync::crate::`-like or `$crate::`: not ours
        }
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    found.insert(ident(item.trim()));
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The items `src/lib.rs` re-exports at the crate root, by name, with the module each comes
/// from (`pub use daemon::{Daemon, RunError};`): `crate::RunError` is a use of `daemon`.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else { continue };
        let path = path.trim_end_matches(';');
        let module: String = path.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let names = match path.split_once('{') {
            Some((_, group)) => group.trim_end_matches('}').split(',').map(str::trim).collect(),
            None => vec![path.rsplit("::").next().unwrap_or_default().trim()],
        };
        for name in names.into_iter().filter(|n| !n.is_empty()) {
            found.insert(name.to_owned(), module.clone());
        }
    }
    found
}

/// The module `crate::name` belongs to: a module itself, or an item re-exported at the root.
fn resolve(name: &str, reexports: &BTreeMap<String, String>) -> String {
    if LAYERS.iter().any(|layer| layer.contains(&name)) {
        return name.to_owned();
    }
    reexports.get(name).cloned().unwrap_or_else(|| {
        panic!("`crate::{name}` is neither a module of src/lib.rs's layers nor an item it re-exports")
    })
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(&root().join("src"));
    let sources =
        files.iter().filter_map(|file| Some((module_of(file)?, std::fs::read_to_string(file).unwrap())));
    graph_of(sources, &std::fs::read_to_string(root().join("src/lib.rs")).unwrap())
}

/// Which modules each module uses, from (module, source text) pairs and the text of `lib.rs`.
fn graph_of(
    sources: impl Iterator<Item = (String, String)>,
    lib: &str,
) -> BTreeMap<String, BTreeSet<String>> {
    let reexports = root_reexports(lib);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources {
        let uses = graph.entry(module.clone()).or_default();
        for used in crate_references(&text) {
            let used = resolve(&used, &reexports);
            if used != module {
                uses.insert(used);
            }
        }
    }
    graph
}

/// Each use of a module of a higher layer, described.
fn upward_uses(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut violations = Vec::new();
    for (module, uses) in graph {
        for used in uses {
            if layer_of(used) > layer_of(module) {
                violations.push(format!(
                    "{module} (layer {}) uses {used} (layer {})",
                    layer_of(module) + 1,
                    layer_of(used) + 1
                ));
            }
        }
    }
    violations
}

#[test]
fn modules_only_use_their_own_layer_or_lower_ones() {
    let graph = module_graph();
    assert!(graph.len() >= 15, "found only {} modules under src/", graph.len());
    let violations = upward_uses(&graph);
    assert!(violations.is_empty(), "a lower layer reaches up:\n{}", violations.join("\n"));
}

#[test]
fn modules_form_no_cycle() {
    let graph = module_graph();
    // Depth-first search; a module met again while still on the stack closes a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| *s == m) {
            let mut cycle: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        stack.push(m);
        for next in graph.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle among src/ modules: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_reference_parser_sees_every_form() {
    let text = "use crate::db::{self, DbError};\nuse crate::{config::Config, outbox};\nlet x = crate::keap::http_client();";
    let found: Vec<String> = crate_references(text).into_iter().collect();
    assert_eq!(found, ["config", "db", "keap", "outbox"]);
}

/// A type used through the crate root counts as a use of the module it comes from: `db`
/// naming the daemon's error is caught, whichever way it is spelled.
#[test]
fn an_upward_use_of_a_type_is_caught_however_it_is_spelled() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    for spelling in [
        "fn f() -> Result<(), crate::RunError> { todo!() }",
        "use crate::{RunError, config::Config};",
        "use crate::daemon::RunError;",
    ] {
        let graph = graph_of([("db".to_owned(), spelling.to_owned())].into_iter(), &lib);
        assert_eq!(upward_uses(&graph), ["db (layer 2) uses daemon (layer 7)"], "{spelling}");
    }
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    // Spelled in pieces so this file does not match itself.
    let outside = [["../", "shared"].concat(), ["API", "-NOTES"].concat(), ["DESIGN", ".md"].concat()];
    let mut hits = Vec::new();
    let mut stack = vec![root()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') || name == ".ci" {
                    stack.push(path);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            for (n, line) in text.lines().enumerate() {
                if outside.iter().any(|o| line.contains(o.as_str())) {
                    hits.push(format!(
                        "{}:{}: {}",
                        path.strip_prefix(root()).unwrap().display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(hits.is_empty(), "these lines point outside the repository:\n{}", hits.join("\n"));
}

/// ARCHITECTURE.md's table of invariants names, for each of the sixteen, integration tests that
/// exist (`module::name` is `fn name` in `tests/it/module.rs`), so a renamed or removed test
/// cannot leave an invariant guarded on paper only.
#[test]
fn every_invariant_names_tests_that_exist() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut guarded = BTreeSet::new();
    for row in
        text.lines().filter(|l| l.starts_with("| ") && l.as_bytes().get(2).is_some_and(u8::is_ascii_digit))
    {
        let number: u32 = row[2..].split_whitespace().next().unwrap().parse().unwrap();
        let tests: Vec<&str> = row.split('`').skip(1).step_by(2).filter(|t| t.contains("::")).collect();
        assert!(!tests.is_empty(), "invariant {number} names no test");
        for test in tests {
            let (module, name) = test.split_once("::").unwrap();
            let source = std::fs::read_to_string(root().join(format!("tests/it/{module}.rs")))
                .unwrap_or_else(|e| panic!("invariant {number}: {test}: tests/it/{module}.rs: {e}"));
            assert!(source.contains(&format!("fn {name}(")), "invariant {number}: no test {test}");
        }
        guarded.insert(number);
    }
    // 17, 18 and 21 have their first part (issue 29: consent, and the sweep's inbound columns).
    let built: BTreeSet<u32> = (1..=21).collect();
    assert_eq!(guarded, built, "every invariant built so far has a row");
}
