//! The layering of `src/` (lib.rs and ARCHITECTURE.md): every module imports only
//! from layers below its own, modules of one layer never import each other, no two
//! submodules of a module import each other in a circle, and what ARCHITECTURE.md
//! states as invariants holds. Reads every `crate::` and `super::` path in `src/`
//! (the tools in `src/bin/` are outside the library and not checked).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and its layer, bottom (0) to top.
const LAYERS: &[(&str, u32)] = &[
    ("event", 0),
    ("clock", 0),
    ("threads", 0),
    ("config", 1),
    ("telemetry", 2),
    ("policy", 3),
    ("resilience", 4),
    ("batcher", 4),
    ("sinks", 5),
    ("spool", 5),
    ("dedup", 5),
    ("pipeline", 6),
    ("intake", 7),
    ("server", 8),
    ("cli", 9),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(name, _)| *name == module).map(|(_, layer)| *layer)
}

/// One source file: its module path (`["intake", "segment", "parse"]`) and lines.
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    text: String,
}

fn source_files() -> Vec<SourceFile> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    files
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<SourceFile>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let relative = path.strip_prefix(root).unwrap().to_path_buf();
        if relative.starts_with("bin") || relative == Path::new("main.rs") || relative == Path::new("lib.rs") {
            continue;
        }
        if path.is_dir() {
            collect(root, &path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|last| last == "mod") {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            files.push(SourceFile { path, module, text });
        }
    }
}

/// Every module path a line names, resolved from the crate root: `crate::a::b`,
/// and `super::…` chains resolved against the file's own module. Only the first
/// two segments matter here.
fn imports(file: &SourceFile, line: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let code = line.split("//").next().unwrap_or("");
    let is_path_char = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    for (start, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        if start > 0 && code[..start].ends_with(|c: char| is_path_char(c)) {
            continue; // part of a longer path (`super::super::`), read from its start
        }
        let path: String = code[start..].chars().take_while(|c| is_path_char(*c)).collect();
        let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let mut resolved: Vec<String> = if segments.first() == Some(&"crate") {
            segments.remove(0);
            Vec::new()
        } else {
            // `super` from a file's module: mod.rs files are their module.
            let mut base = file.module.clone();
            while segments.first() == Some(&"super") {
                segments.remove(0);
                base.pop();
            }
            base
        };
        resolved.extend(segments.iter().map(|s| s.to_string()));
        found.push(resolved);
    }
    found
}

#[test]
fn every_import_points_to_a_lower_layer() {
    let mut problems = Vec::new();
    for file in source_files() {
        let own = &file.module[0];
        let Some(own_layer) = layer(own) else {
            problems.push(format!(
                "{}: module `{own}` has no layer; add it to LAYERS and lib.rs",
                file.path.display()
            ));
            continue;
        };
        for (number, line) in file.text.lines().enumerate() {
            for target in imports(&file, line) {
                let Some(other) = target.first() else { continue };
                if other == own || other.chars().next().is_some_and(|c| c.is_uppercase()) {
                    continue;
                }
                let Some(other_layer) = layer(other) else {
                    continue; // an item at the crate root (none today) or a macro path
                };
                if other_layer >= own_layer {
                    let why = if other_layer == own_layer {
                        "modules of one layer never import each other"
                    } else {
                        "an import must point to a lower layer"
                    };
                    problems.push(format!(
                        "{}:{}: `{own}` (layer {own_layer}) imports `{other}` (layer {other_layer}): {why}\n    {}",
                        file.path.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "imports against the layering:\n{}",
        problems.join("\n")
    );
}

#[test]
fn submodules_of_a_module_never_import_each_other_in_a_circle() {
    // Edges between sibling submodules: `intake::http` → `intake::ingest`.
    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut seen_at: BTreeMap<(String, String, String), String> = BTreeMap::new();
    let files = source_files();
    for file in &files {
        if file.module.len() < 2 {
            continue;
        }
        let (parent, own) = (&file.module[0], &file.module[1]);
        for (number, line) in file.text.lines().enumerate() {
            for target in imports(file, line) {
                if target.len() < 2 || &target[0] != parent || &target[1] == own {
                    continue;
                }
                let sibling = &target[1];
                if !files
                    .iter()
                    .any(|f| f.module.len() >= 2 && &f.module[0] == parent && &f.module[1] == sibling)
                {
                    continue; // an item of the parent's mod.rs, not a submodule
                }
                edges
                    .entry((parent.clone(), own.clone()))
                    .or_default()
                    .insert(sibling.clone());
                seen_at
                    .entry((parent.clone(), own.clone(), sibling.clone()))
                    .or_insert_with(|| format!("{}:{}", file.path.display(), number + 1));
            }
        }
    }
    let mut cycles = Vec::new();
    for ((parent, from), targets) in &edges {
        for to in targets {
            // A path back from `to` to `from` closes a circle.
            let mut stack = vec![to.clone()];
            let mut visited = BTreeSet::new();
            while let Some(node) = stack.pop() {
                if &node == from {
                    cycles.push(format!(
                        "`{parent}::{from}` → `{parent}::{to}` ({}) and back",
                        seen_at[&(parent.clone(), from.clone(), to.clone())]
                    ));
                    break;
                }
                if visited.insert(node.clone()) {
                    if let Some(next) = edges.get(&(parent.clone(), node)) {
                        stack.extend(next.iter().cloned());
                    }
                }
            }
        }
    }
    assert!(cycles.is_empty(), "submodules in a circle:\n{}", cycles.join("\n"));
}

#[test]
fn lib_rs_lists_the_modules_in_layer_order() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|line| line.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    let expected: Vec<&str> = LAYERS.iter().map(|(name, _)| *name).collect();
    assert_eq!(declared, expected, "lib.rs must declare every module, in LAYERS order");
}

/// ARCHITECTURE.md's invariants that a reading of the source can check.
#[test]
fn the_architecture_invariants_hold() {
    let mut problems = Vec::new();
    for file in source_files() {
        let module = file.module.join("::");
        let top = file.module[0].as_str();
        for (number, line) in file.text.lines().enumerate() {
            let at = || format!("{}:{}: {}", file.path.display(), number + 1, line.trim());
            if line.contains("AppState") && top != "server" {
                problems.push(format!("nothing below `server` names `AppState`: {}", at()));
            }
            if (top == "event" || top == "clock" || top == "threads") && line.contains("crate::") {
                problems.push(format!("`{top}` imports nothing from the crate: {}", at()));
            }
            if top == "resilience" && line.contains("Sink") {
                problems.push(format!("`resilience` holds no sink-specific code: {}", at()));
            }
            if top == "batcher" && (line.contains("SinkError") || line.contains("SpoolError")) {
                problems.push(format!("`batcher` is generic over its error: {}", at()));
            }
            // (`"file":` is a JSON key on /admin/policy and `.field("file", …)` a Debug
            // field: both the policy or secret file's path.)
            let names_a_sink = ["\"file\"", "\"clickhouse\"", "\"kafka\""]
                .iter()
                .any(|name| line.contains(name) && !line.contains(&format!("{name}:")) && !line.contains(".field("));
            if names_a_sink && module != "event" && !line.trim_start().starts_with("//") {
                problems.push(format!("sinks are named by `SinkKind`, not strings: {}", at()));
            }
        }
        // `journal.rs` is not a sink: the in-doubt journal Kafka and ClickHouse share.
        let flat_in_sinks = file.path.parent().is_some_and(|dir| dir.ends_with("src/sinks"))
            && file
                .path
                .file_name()
                .is_some_and(|name| name != "mod.rs" && name != "journal.rs");
        if flat_in_sinks {
            problems.push(format!(
                "every sink is a folder (mod.rs, errors.rs, …), not a flat file: {}",
                file.path.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_sink_has_the_same_shape() {
    let sinks = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sinks");
    let mut found = 0;
    for entry in std::fs::read_dir(&sinks).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        found += 1;
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let module = std::fs::read_to_string(path.join("mod.rs")).unwrap_or_default();
        let errors = std::fs::read_to_string(path.join("errors.rs")).unwrap_or_default();
        assert!(
            module.contains("pub fn start(") && module.contains("-> Result<SinkHandle,"),
            "sinks/{name}/mod.rs must have `pub fn start(settings, batch) -> Result<SinkHandle, …>`"
        );
        assert!(
            errors.contains("impl ClassifyError for") && errors.contains("for SinkError"),
            "sinks/{name}/errors.rs must classify its error (ClassifyError) and convert it into SinkError"
        );
    }
    assert_eq!(found, 3, "file, clickhouse and kafka");
}
