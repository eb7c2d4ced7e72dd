//! The agent's structure, checked: imports point one way. A module may use only the layers
//! listed before it in `agent/src/lib.rs` (and its own), and no group of files imports each
//! other in a cycle, in any crate of the workspace. Reads the source text, as
//! `../shared/tools/module-cycles` does, so it runs anywhere without root.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Module path (e.g. ["config", "check"]) of every .rs file under `src`.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut found = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            found.insert(parts, path);
        }
    }
    found
}

/// Source without line comments (doc comments name modules without importing them).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths of one use-tree starting at `tree` (`a::b`, `a::{b, c::d}`, `{a, b}`), each
/// appended to `base`; nested groups are expanded.
fn tree_paths(base: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let mut path = base.to_vec();
    let mut rest = tree.trim_start();
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at its top-level commas and expand each part.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth > 0 => depth -= 1,
                    ',' | '}' if depth == 0 => {
                        let part = group[start..i].trim();
                        if !part.is_empty() {
                            tree_paths(&path, part, out);
                        }
                        if c == '}' {
                            return;
                        }
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        path.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(next) if next.starts_with(is_ident) || next.starts_with('{') => rest = next,
            _ => break,
        }
    }
    out.push(path);
}

/// Every path a file names after `crate::` or `super::`, resolved to module paths.
fn used_paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", module[..module.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before_ok = at == 0 || !rest[..at].ends_with(is_ident);
            rest = &rest[at + prefix.len()..];
            if before_ok {
                tree_paths(&base, rest, &mut paths);
            }
        }
    }
    paths
}

/// Edges between module files: each used path resolved to the longest module it names.
fn file_graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let modules = modules(src);
    let mut graph = BTreeMap::new();
    for (module, path) in &modules {
        let targets: BTreeSet<Vec<String>> = used_paths(module, &code(path))
            .into_iter()
            .filter_map(|used| {
                (1..=used.len())
                    .rev()
                    .map(|n| used[..n].to_vec())
                    .find(|prefix| modules.contains_key(prefix))
            })
            .filter(|target| target != module)
            .collect();
        graph.insert(module.clone(), targets);
    }
    graph
}

/// Groups of nodes that reach each other (Tarjan), larger than one.
fn cycles<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        out: Vec<Vec<N>>,
    }
    fn visit<N: Ord + Clone>(v: &N, graph: &BTreeMap<N, BTreeSet<N>>, s: &mut State<N>) {
        let i = s.index.len();
        s.index.insert(v.clone(), i);
        s.low.insert(v.clone(), i);
        s.stack.push(v.clone());
        for w in graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(w, graph, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v.clone(), low);
            } else if s.stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v.clone(), low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                let done = &w == v;
                component.push(w);
                if done {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(v, graph, &mut state);
        }
    }
    state.out
}

#[test]
fn no_crate_has_an_import_cycle_between_files_or_top_level_modules() {
    for krate in ["agent", "agent-common", "agent-ebpf", "tests", "xtask"] {
        let graph = file_graph(&workspace().join(krate).join("src"));
        let file_cycles = cycles(&graph);
        assert!(
            file_cycles.is_empty(),
            "{krate}: files in a cycle: {file_cycles:?}"
        );
        let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, targets) in &graph {
            for to in targets {
                if let (Some(a), Some(b)) = (from.first(), to.first())
                    && a != b
                {
                    top.entry(a.clone()).or_default().insert(b.clone());
                }
            }
        }
        let module_cycles = cycles(&top);
        assert!(
            module_cycles.is_empty(),
            "{krate}: modules in a cycle: {module_cycles:?}"
        );
    }
}

/// The layers of `agent/src/lib.rs`, lowest first; modules of one layer may not use each
/// other (kernel and host are siblings, as are export and report).
const LAYERS: &[&[&str]] = &[
    &["files", "model"],
    &["kernel", "host", "engines"],
    &["config"],
    &["analysis"],
    &["budgets"],
    &["export", "report"],
    &["app", "cli"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| {
            panic!("agent/src/{module} is in no layer: add it to LAYERS and to lib.rs")
        })
}

#[test]
fn agent_modules_use_only_the_layers_below_them() {
    let graph = file_graph(&workspace().join("agent/src"));
    // The resolver sees through groups to the file: app/daemon.rs names
    // `budgets::{actions::{...}}`.
    let daemon = ["app", "daemon"].map(String::from).to_vec();
    let actions = ["budgets", "actions"].map(String::from).to_vec();
    assert!(graph[&daemon].contains(&actions), "{:?}", graph[&daemon]);
    let mut wrong = Vec::new();
    for (from, targets) in &graph {
        let Some(from_top) = from.first() else {
            continue;
        };
        for to in targets {
            let Some(to_top) = to.first() else { continue };
            if from_top != to_top && layer(to_top) >= layer(from_top) {
                wrong.push(format!("{} uses {}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the data flow: {wrong:#?}"
    );
}

#[test]
fn the_checker_finds_a_planted_cycle() {
    let dir = std::env::temp_dir().join(format!("envelope-architecture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::{inner::Thing, other};\n").unwrap();
    std::fs::write(dir.join("b/mod.rs"), "pub mod inner;\n").unwrap();
    std::fs::write(
        dir.join("b/inner.rs"),
        "// crate::a is only named here\nuse crate::{a::X};\n",
    )
    .unwrap();
    let graph = file_graph(&dir);
    let found = cycles(&graph);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 1, "{graph:?}");
    let mut members = found[0].clone();
    members.sort();
    assert_eq!(
        members,
        vec![
            vec!["a".to_string()],
            vec!["b".to_string(), "inner".to_string()]
        ]
    );
}
