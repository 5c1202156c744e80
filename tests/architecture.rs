//! The layering test (issue #12): imports between files of `src/` point only down the layer
//! table below, form no cycle, and every file sits in a layer. Paths are read by a small
//! hand-written lexer (comments and literals dropped), so no dependency is needed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// The layer map, bottom to top: a file may import its own layer or any layer listed before it.
/// A pattern is an exact file (`src/clock.rs`) or a directory subtree (`src/proxy/`, ending in
/// `/`). The most specific pattern wins: an exact file over any directory, a longer directory
/// over a shorter one. Patterns for files that do not exist yet are fine.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaf",
        &[
            "src/clock.rs",
            "src/tls.rs",
            "src/error.rs",
            "src/metrics.rs",
            "src/discovery.rs",
            "src/limits.rs",
            "src/rules.rs",
            "src/rules/",
            "src/body.rs",
            "src/conn.rs",
            "src/mock.rs",
        ],
    ),
    (
        "domain",
        &[
            "src/balancer.rs",
            "src/balancer/",
            "src/health.rs",
            "src/mesh.rs",
            "src/discovery/consul.rs",
            "src/discovery/consul/",
            "src/telemetry.rs",
            "src/telemetry/",
            "src/ratelimit.rs",
            "src/ratelimit/",
            "src/auth.rs",
            "src/auth/",
            "src/cache.rs",
            "src/cache/",
        ],
    ),
    ("data", &["src/proxy.rs", "src/proxy/"]),
    ("serving", &["src/server.rs", "src/server/"]),
    ("config", &["src/config.rs", "src/config/"]),
    ("control", &["src/control.rs", "src/control/"]),
    ("admin", &["src/admin.rs", "src/admin/"]),
    (
        "root",
        &[
            "src/lib.rs",
            "src/builder.rs",
            "src/demo.rs",
            "src/main.rs",
            "src/bin/",
        ],
    ),
];

/// A layer table: `(layer name, path patterns)`, bottom to top.
type Layers<'a> = [(&'a str, &'a [&'a str])];

#[test]
fn src_imports_point_down_and_form_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    read_rs_files(&root.join("src"), root, &mut files);
    assert!(!files.is_empty(), "no .rs files under {}", root.display());
    let problems = check(&files, LAYERS);
    assert!(
        problems.is_empty(),
        "{} architecture problem(s); the layer table is at the top of tests/architecture.rs:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn layer_table_names_each_pattern_once() {
    let mut seen = BTreeMap::new();
    for (layer, patterns) in LAYERS {
        for p in *patterns {
            assert!(p.starts_with("src/"), "pattern {p} is not under src/");
            assert!(
                p.ends_with(".rs") || p.ends_with('/'),
                "pattern {p} is neither a .rs file nor a directory ending in /"
            );
            if let Some(other) = seen.insert(*p, *layer) {
                panic!("pattern {p} is in both {other} and {layer}");
            }
        }
    }
}

/// Collects `(path relative to the crate with / separators, contents)` for every `.rs` below `dir`.
fn read_rs_files(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_rs_files(&path, root, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path.strip_prefix(root).expect("below the crate root");
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            out.push((rel, text));
        }
    }
}

// === the check ===

/// Every problem in `files` against `layers`, one line each: files in no layer, upward imports,
/// then each import cycle (its files, then the imports inside it).
fn check(files: &[(String, String)], layers: &Layers<'_>) -> Vec<String> {
    let graph = Graph::build(files);
    let mut problems = Vec::new();
    let layer: BTreeMap<&str, Option<usize>> = files
        .iter()
        .map(|(f, _)| (f.as_str(), layer_of(f, layers)))
        .collect();
    for (file, l) in &layer {
        if l.is_none() {
            problems.push(format!("{file} is in no layer of the table"));
        }
    }
    for imp in graph.imports.iter() {
        // A file in no layer is reported above; its imports have no rank to compare.
        let (Some(Some(from)), Some(Some(to))) =
            (layer.get(imp.from.as_str()), layer.get(imp.target.as_str()))
        else {
            continue;
        };
        if from < to {
            problems.push(format!(
                "{} ({}) imports {} from {} ({})",
                imp.from,
                layers[*from].0,
                imp.shown(),
                imp.target,
                layers[*to].0
            ));
        }
    }
    for scc in graph.cycles() {
        problems.push(format!(
            "import cycle between {} files: {}",
            scc.len(),
            scc.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
        for imp in graph.imports.iter() {
            if scc.contains(&imp.from) && scc.contains(&imp.target) {
                problems.push(format!(
                    "  in the cycle: {} imports {} from {}",
                    imp.from,
                    imp.shown(),
                    imp.target
                ));
            }
        }
    }
    problems
}

/// The index of `file`'s layer in `layers`: the most specific matching pattern wins.
fn layer_of(file: &str, layers: &Layers<'_>) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None; // (specificity, layer)
    for (i, (_, patterns)) in layers.iter().enumerate() {
        for p in *patterns {
            let specificity = if *p == file {
                usize::MAX
            } else if p.ends_with('/') && file.starts_with(p) {
                p.len()
            } else {
                continue;
            };
            if best.is_none_or(|(s, _)| specificity > s) {
                best = Some((specificity, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

// === the file graph ===

/// One import edge between two different files.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    /// The importing file.
    from: String,
    /// The path as `crate::…` (for a bin, `meshgate::` is read as `crate::`).
    path: String,
    /// The path as written, when it differs (`super::head::HeadError`, an alias).
    written: String,
    /// The file whose module the path resolves to.
    target: String,
}

impl Import {
    /// The path for a message, with its written form when that differs.
    fn shown(&self) -> String {
        if self.written == self.path {
            self.path.clone()
        } else {
            format!("{} (written {})", self.path, self.written)
        }
    }
}

/// Which crate a file belongs to: the library, or a binary whose root is that file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Krate {
    Lib,
    Bin(String),
}

/// An absolute module path inside a crate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Abs {
    krate: Krate,
    segs: Vec<String>,
}

/// The import graph between the files of `src/`.
struct Graph {
    /// Every import, sorted and deduplicated by (from, path).
    imports: Vec<Import>,
    files: Vec<String>,
}

impl Graph {
    /// Reads every file's imports; `files` is `(path like src/a.rs, contents)`.
    fn build(files: &[(String, String)]) -> Graph {
        let modules: HashMap<Vec<String>, String> = files
            .iter()
            .filter_map(|(f, _)| match module_of(f) {
                (Krate::Lib, segs) => Some((segs, f.clone())),
                (Krate::Bin(_), _) => None,
            })
            .collect();
        let mut imports = BTreeMap::new();
        for (file, src) in files {
            for imp in imports_of(file, src, &modules) {
                imports
                    .entry((imp.from.clone(), imp.path.clone()))
                    .or_insert(imp);
            }
        }
        Graph {
            imports: imports.into_values().collect(),
            files: files.iter().map(|(f, _)| f.clone()).collect(),
        }
    }

    /// Strongly connected components with more than one file (Tarjan), each sorted.
    fn cycles(&self) -> Vec<BTreeSet<String>> {
        let index: HashMap<&str, usize> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.as_str(), i))
            .collect();
        let mut adj = vec![BTreeSet::new(); self.files.len()];
        for imp in &self.imports {
            if let (Some(&a), Some(&b)) =
                (index.get(imp.from.as_str()), index.get(imp.target.as_str()))
            {
                adj[a].insert(b);
            }
        }
        let mut t = Tarjan {
            adj: &adj,
            next: 0,
            index: vec![None; adj.len()],
            low: vec![0; adj.len()],
            stack: Vec::new(),
            on_stack: vec![false; adj.len()],
            sccs: Vec::new(),
        };
        for v in 0..adj.len() {
            if t.index[v].is_none() {
                t.visit(v);
            }
        }
        let mut out: Vec<BTreeSet<String>> = t
            .sccs
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|c| c.into_iter().map(|i| self.files[i].clone()).collect())
            .collect();
        out.sort();
        out
    }
}

/// Tarjan's strongly-connected-components walk over file indices (recursive: `src/` is small).
struct Tarjan<'a> {
    adj: &'a [BTreeSet<usize>],
    next: usize,
    index: Vec<Option<usize>>,
    low: Vec<usize>,
    stack: Vec<usize>,
    on_stack: Vec<bool>,
    sccs: Vec<Vec<usize>>,
}

impl Tarjan<'_> {
    fn visit(&mut self, v: usize) {
        self.index[v] = Some(self.next);
        self.low[v] = self.next;
        self.next += 1;
        self.stack.push(v);
        self.on_stack[v] = true;
        for &w in &self.adj[v] {
            match self.index[w] {
                None => {
                    self.visit(w);
                    self.low[v] = self.low[v].min(self.low[w]);
                }
                Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(self.low[v]) == self.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = self.stack.pop().expect("v is on the stack");
                self.on_stack[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            self.sccs.push(scc);
        }
    }
}

/// The crate and module path of a file: `src/a.rs` and `src/a/mod.rs` are `crate::a`,
/// `src/lib.rs` is `crate`; `src/main.rs` and everything in `src/bin/` are binary roots.
fn module_of(file: &str) -> (Krate, Vec<String>) {
    if file == "src/main.rs" || file.starts_with("src/bin/") {
        return (Krate::Bin(file.to_string()), Vec::new());
    }
    if file == "src/lib.rs" {
        return (Krate::Lib, Vec::new());
    }
    let rel = file.strip_prefix("src/").unwrap_or(file);
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut segs: Vec<String> = rel.split('/').map(str::to_string).collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    (Krate::Lib, segs)
}

/// The file an absolute path lands in: the longest prefix that is a file-backed module.
/// Inline modules are not in `modules`, so a path into one lands in its file.
fn resolve(abs: &Abs, modules: &HashMap<Vec<String>, String>) -> Option<String> {
    match &abs.krate {
        // Binaries declare no module files of their own here: their `crate::` is the file.
        Krate::Bin(file) => Some(file.clone()),
        Krate::Lib => (0..=abs.segs.len())
            .rev()
            .find_map(|k| modules.get(&abs.segs[..k]).cloned()),
    }
}

/// The imports of one file, in source order, self-imports dropped.
fn imports_of(file: &str, src: &str, modules: &HashMap<Vec<String>, String>) -> Vec<Import> {
    let (krate, module) = module_of(file);
    let mentions = parse(&lex(src));
    let ctx = Ctx {
        krate,
        module,
        modules,
    };
    // Aliases bound by `use` (file-wide; a later `use` may feed an earlier one, so repeat).
    let mut aliases: HashMap<String, Abs> = HashMap::new();
    loop {
        let before = aliases.len();
        for m in mentions.iter().filter(|m| m.from_use) {
            if let (Some(name), Some(abs)) = (&m.binds, ctx.absolute(m, &aliases)) {
                if name != "_" {
                    aliases.entry(name.clone()).or_insert(abs);
                }
            }
        }
        if aliases.len() == before {
            break;
        }
    }
    let mut out = Vec::new();
    for m in &mentions {
        let Some(abs) = ctx.absolute(m, &aliases) else {
            continue;
        };
        let Some(target) = resolve(&abs, modules) else {
            continue;
        };
        if target == file {
            continue;
        }
        // `Type::new` or `Enum::Variant` through a `use`d name adds nothing when it lands in
        // the file the `use` already names; `alias::child::X` landing deeper is kept.
        let via = m.segs.first().and_then(|f| aliases.get(f));
        if !m.from_use
            && via.is_some_and(|a| resolve(a, modules).as_ref() == Some(&target))
            && ctx.child(m).is_none()
        {
            continue;
        }
        let mut path = std::iter::once("crate")
            .chain(abs.segs.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("::");
        let mut written = m.segs.join("::");
        if m.glob {
            path.push_str("::*");
            written.push_str("::*");
        }
        out.push(Import {
            from: file.to_string(),
            path,
            written,
            target,
        });
    }
    out
}

/// Where a file sits, for turning its mentions into absolute paths.
struct Ctx<'a> {
    krate: Krate,
    module: Vec<String>,
    modules: &'a HashMap<Vec<String>, String>,
}

impl Ctx<'_> {
    /// The module a bare first segment names when it is a child module in scope
    /// (`use admin::AdminState;` in lib.rs), looking from the innermost inline module out.
    fn child(&self, m: &Mention) -> Option<Vec<String>> {
        if self.krate != Krate::Lib {
            return None;
        }
        let name = m.segs.first()?;
        let scope: Vec<String> = self.module.iter().chain(&m.inline).cloned().collect();
        (self.module.len()..=scope.len()).rev().find_map(|k| {
            let mut p = scope[..k].to_vec();
            p.push(name.clone());
            self.modules.contains_key(&p).then_some(p)
        })
    }

    /// The absolute path a mention names, or `None` for other crates and unknown names.
    fn absolute(&self, m: &Mention, aliases: &HashMap<String, Abs>) -> Option<Abs> {
        let mut scope: Vec<String> = self.module.iter().chain(&m.inline).cloned().collect();
        let (first, rest) = m.segs.split_first()?;
        let (krate, mut segs) = match first.as_str() {
            "crate" => (self.krate.clone(), Vec::new()),
            "meshgate" if matches!(self.krate, Krate::Bin(_)) => (Krate::Lib, Vec::new()),
            "self" => (self.krate.clone(), scope),
            "super" => {
                scope.pop()?;
                (self.krate.clone(), scope)
            }
            name => match self.child(m) {
                Some(p) => (Krate::Lib, p),
                None => {
                    let a = aliases.get(name)?;
                    (a.krate.clone(), a.segs.clone())
                }
            },
        };
        for s in rest {
            if s == "super" {
                segs.pop()?;
            } else {
                segs.push(s.clone());
            }
        }
        Some(Abs { krate, segs })
    }
}

// === lexer and parser ===

/// A token of Rust source, reduced to what path reading needs.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
    /// A string, char or number literal (contents dropped).
    Lit,
}

/// Tokens of Rust source with comments, strings, chars and lifetimes removed.
fn lex(src: &str) -> Vec<Tok> {
    let s: Vec<char> = src.chars().collect();
    let at = |i: usize| s.get(i).copied().unwrap_or('\0');
    let is_ident = |c: char| c == '_' || c.is_alphanumeric();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            // Block comments nest.
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&s, i + 1);
            out.push(Tok::Lit);
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                // An escaped char: skip the escape, then up to the closing quote.
                i += 3;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(Tok::Lit);
            } else if at(i + 2) == '\'' {
                i += 3;
                out.push(Tok::Lit);
            } else {
                // A lifetime or a label.
                i += 1;
                while i < s.len() && is_ident(s[i]) {
                    i += 1;
                }
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Tok::Sep);
            i += 2;
        } else if c.is_ascii_digit() {
            while i < s.len() && is_ident(s[i]) {
                i += 1;
            }
            out.push(Tok::Lit);
        } else if is_ident(c) {
            let start = i;
            while i < s.len() && is_ident(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            let hashes = s[i..].iter().take_while(|&&c| c == '#').count();
            if raw_prefix && at(i + hashes) == '"' {
                // A raw string ends at a quote followed by as many hashes as it opened with.
                i += hashes + 1;
                while i < s.len() {
                    if s[i] == '"' && s[i + 1..].iter().take_while(|&&c| c == '#').count() >= hashes
                    {
                        i += 1 + hashes;
                        break;
                    }
                    i += 1;
                }
                out.push(Tok::Lit);
            } else if word == "r" && hashes == 1 && is_ident(at(i + 1)) {
                // A raw identifier, `r#type`.
                let start = i + 1;
                i += 1;
                while i < s.len() && is_ident(s[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(s[start..i].iter().collect()));
            } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                i = skip_string(&s, i + 1);
                out.push(Tok::Lit);
            } else {
                out.push(Tok::Ident(word));
            }
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// The index just past the closing quote of a string whose contents start at `i`.
fn skip_string(s: &[char], mut i: usize) -> usize {
    while i < s.len() {
        match s[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// A path the source names: from a `use` tree (one per leaf) or from code.
#[derive(Debug, Clone, PartialEq)]
struct Mention {
    /// Inline modules (`mod tests { .. }`) around the mention, outermost first.
    inline: Vec<String>,
    /// The segments as written, `super` and `self` included.
    segs: Vec<String>,
    /// `use …::*`
    glob: bool,
    /// The name a `use` leaf binds (its last segment or its `as` rename).
    binds: Option<String>,
    from_use: bool,
}

/// Every `use` leaf and every multi-segment path in code, with its inline-module scope.
/// `mod x;` declarations are not mentions, nor are `pub(crate)`-style visibilities.
fn parse(toks: &[Tok]) -> Vec<Mention> {
    let ident = |i: usize| match toks.get(i) {
        Some(Tok::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    let punct = |i: usize, c: char| toks.get(i) == Some(&Tok::Punct(c));
    let mut out = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new(); // (name, brace depth inside it)
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(w) if w == "mod" && ident(i + 1).is_some() && punct(i + 2, '{') => {
                inline.push((ident(i + 1).unwrap_or_default().to_string(), depth + 1));
                depth += 1;
                i += 3;
            }
            // `pub(in crate::a)` restricts visibility; it imports nothing.
            Tok::Ident(w) if w == "pub" && punct(i + 1, '(') && ident(i + 2) == Some("in") => {
                i += 3;
                while i < toks.len() && !punct(i, ')') {
                    i += 1;
                }
            }
            // `use<'a>` is precise capturing in an `impl Trait`, not an import.
            Tok::Ident(w) if w == "use" && !punct(i + 1, '<') => {
                i += 1;
                let mut leaves = Vec::new();
                use_tree(toks, &mut i, Vec::new(), &mut leaves);
                while i < toks.len() && !punct(i, ';') {
                    i += 1;
                }
                let scope = names(&inline);
                out.extend(leaves.into_iter().map(|(segs, glob, binds)| Mention {
                    inline: scope.clone(),
                    segs,
                    glob,
                    binds,
                    from_use: true,
                }));
            }
            Tok::Ident(first)
                if toks.get(i + 1) == Some(&Tok::Sep)
                    && ident(i + 2).is_some()
                    && !(i > 0 && (toks[i - 1] == Tok::Sep || toks[i - 1] == Tok::Punct('.'))) =>
            {
                let mut segs = vec![first.clone()];
                i += 1;
                while toks.get(i) == Some(&Tok::Sep) {
                    let Some(next) = ident(i + 1) else { break };
                    segs.push(next.to_string());
                    i += 2;
                }
                out.push(Mention {
                    inline: names(&inline),
                    segs,
                    glob: false,
                    binds: None,
                    from_use: false,
                });
            }
            _ => i += 1,
        }
    }
    out
}

/// The names of the inline modules on the stack, outermost first.
fn names(inline: &[(String, usize)]) -> Vec<String> {
    inline.iter().map(|(n, _)| n.clone()).collect()
}

/// Parses one use tree at `*i` below `prefix`, pushing `(segments, glob, bound name)` per leaf.
fn use_tree(
    toks: &[Tok],
    i: &mut usize,
    prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, bool, Option<String>)>,
) {
    let mut segs = prefix;
    if toks.get(*i) == Some(&Tok::Sep) {
        // `::name` is always another crate.
        if segs.is_empty() {
            segs.push("::".to_string());
        }
        *i += 1;
    }
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(s)) => {
                segs.push(s.clone());
                *i += 1;
                if toks.get(*i) == Some(&Tok::Sep) {
                    *i += 1;
                    continue;
                }
                break;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                while *i < toks.len() {
                    match toks[*i] {
                        Tok::Punct('}') => {
                            *i += 1;
                            break;
                        }
                        Tok::Punct(',') => *i += 1,
                        _ => {
                            let before = *i;
                            use_tree(toks, i, segs.clone(), out);
                            if *i == before {
                                *i += 1; // malformed; do not spin
                            }
                        }
                    }
                }
                return;
            }
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push((segs, true, None));
                return;
            }
            _ => return,
        }
    }
    let mut rename = None;
    if toks.get(*i) == Some(&Tok::Ident("as".to_string())) {
        if let Some(Tok::Ident(name)) = toks.get(*i + 1) {
            rename = Some(name.clone());
        }
        *i += 2;
    }
    // `a::{self}` names `a` itself.
    if segs.last().is_some_and(|s| s == "self") && segs.len() > 1 {
        segs.pop();
    }
    let binds = rename.or_else(|| segs.last().cloned());
    out.push((segs, false, binds));
}

// === checks of the checker ===

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(f, s)| (f.to_string(), s.to_string()))
            .collect()
    }

    /// `(from, path, target)` of every import in a small tree.
    fn edges(list: &[(&str, &str)]) -> Vec<(String, String, String)> {
        Graph::build(&files(list))
            .imports
            .into_iter()
            .map(|i| (i.from, i.path, i.target))
            .collect()
    }

    fn e(from: &str, path: &str, target: &str) -> (String, String, String) {
        (from.into(), path.into(), target.into())
    }

    #[test]
    fn grouped_use_with_nesting_self_renames_and_lines() {
        let got = edges(&[
            ("src/lib.rs", ""),
            ("src/a.rs", ""),
            ("src/a/b.rs", ""),
            ("src/a/c.rs", ""),
            ("src/d.rs", ""),
            (
                "src/x.rs",
                "use crate::{
                     a::{b::{self, Thing}, c as see},
                     d::{self},
                 };
                 pub use crate::a::*;",
            ),
        ]);
        assert_eq!(
            got,
            vec![
                e("src/x.rs", "crate::a::*", "src/a.rs"),
                e("src/x.rs", "crate::a::b", "src/a/b.rs"),
                e("src/x.rs", "crate::a::b::Thing", "src/a/b.rs"),
                e("src/x.rs", "crate::a::c", "src/a/c.rs"),
                e("src/x.rs", "crate::d", "src/d.rs"),
            ]
        );
    }

    #[test]
    fn super_and_self_are_relative_to_the_files_module() {
        let got = edges(&[
            ("src/lib.rs", ""),
            ("src/a.rs", ""),
            (
                "src/a/b.rs",
                "use super::c::X;\nfn f() { super::super::z::go(); }",
            ),
            ("src/a/c.rs", "pub use self::d::Y;"),
            ("src/a/c/d.rs", ""),
            ("src/z.rs", ""),
        ]);
        assert_eq!(
            got,
            vec![
                e("src/a/b.rs", "crate::a::c::X", "src/a/c.rs"),
                e("src/a/b.rs", "crate::z::go", "src/z.rs"),
                e("src/a/c.rs", "crate::a::c::d::Y", "src/a/c/d.rs"),
            ]
        );
    }

    #[test]
    fn super_inside_an_inline_module_is_the_file_itself() {
        let src = "fn f() {}
            #[cfg(test)]
            mod tests {
                use super::*;
                fn g() { super::f(); super::super::b::h(); }
            }
            fn after() { super::c::k(); }";
        let got = edges(&[
            ("src/lib.rs", ""),
            ("src/a.rs", ""),
            ("src/a/x.rs", src),
            ("src/a/b.rs", ""),
            ("src/a/c.rs", ""),
        ]);
        assert_eq!(
            got,
            vec![
                e("src/a/x.rs", "crate::a::b::h", "src/a/b.rs"),
                e("src/a/x.rs", "crate::a::c::k", "src/a/c.rs"),
            ]
        );
    }

    #[test]
    fn comments_are_ignored() {
        let src = "// use crate::a::X;
            /// [crate::a::Y]
            //! crate::a
            /* crate::a::Z /* nested crate::a */ still crate::a */
            fn f() {}";
        assert_eq!(
            edges(&[("src/lib.rs", ""), ("src/a.rs", ""), ("src/b.rs", src)]),
            vec![]
        );
    }

    #[test]
    fn string_and_char_literals_are_ignored() {
        let src = r####"const A: &str = "crate::a::X \" crate::a::Y";
const B: &str = r#"crate::a::Z "quoted" "#;
const C: &[u8] = br##"crate::a::W"##;
const Q: char = '"';
const E: char = '\'';
fn f<'a>(x: &'a str) -> &'a str { let _ = b"crate::a::V"; crate::c::real(); x }"####;
        assert_eq!(
            edges(&[
                ("src/lib.rs", ""),
                ("src/a.rs", ""),
                ("src/c.rs", ""),
                ("src/b.rs", src)
            ]),
            vec![e("src/b.rs", "crate::c::real", "src/c.rs")]
        );
    }

    #[test]
    fn a_path_resolves_to_the_longest_file_backed_prefix() {
        let got = edges(&[
            ("src/lib.rs", ""),
            ("src/proxy/mod.rs", ""),
            ("src/proxy/forward.rs", ""),
            (
                "src/x.rs",
                "use crate::proxy::forward::client;
                 fn f(_: crate::proxy::Foo) { let _ = crate::Reloader::new(); }",
            ),
        ]);
        assert_eq!(
            got,
            vec![
                e("src/x.rs", "crate::Reloader::new", "src/lib.rs"),
                e("src/x.rs", "crate::proxy::Foo", "src/proxy/mod.rs"),
                e(
                    "src/x.rs",
                    "crate::proxy::forward::client",
                    "src/proxy/forward.rs"
                ),
            ]
        );
    }

    #[test]
    fn child_modules_and_use_aliases_resolve_like_crate_paths() {
        let got = edges(&[
            (
                "src/lib.rs",
                "pub mod admin;\nuse admin::State;\nfn f() { proxy::pool::go(); }",
            ),
            ("src/admin.rs", ""),
            ("src/proxy.rs", ""),
            ("src/proxy/pool.rs", ""),
            (
                "src/b.rs",
                "use crate::proxy as p;\nfn f() -> p::pool::Idle { todo!() }",
            ),
            (
                "src/main.rs",
                "use meshgate::admin;\nfn main() { admin::run(); crate::cli(); }",
            ),
        ]);
        assert_eq!(
            got,
            vec![
                e("src/b.rs", "crate::proxy", "src/proxy.rs"),
                e("src/b.rs", "crate::proxy::pool::Idle", "src/proxy/pool.rs"),
                e("src/lib.rs", "crate::admin::State", "src/admin.rs"),
                e("src/lib.rs", "crate::proxy::pool::go", "src/proxy/pool.rs"),
                // `admin::run()` lands where `use meshgate::admin` already points: not repeated.
                e("src/main.rs", "crate::admin", "src/admin.rs"),
            ]
        );
    }

    #[test]
    fn declarations_and_visibilities_are_not_imports() {
        let src = "pub mod b;
            pub(crate) mod c;
            pub(in crate::z) fn f() {}
            pub(super) struct S;
            fn g() -> impl Sized + use<> {}";
        assert_eq!(
            edges(&[
                ("src/lib.rs", ""),
                ("src/a.rs", src),
                ("src/a/b.rs", ""),
                ("src/a/c.rs", ""),
                ("src/z.rs", "")
            ]),
            vec![]
        );
    }

    #[test]
    fn a_three_file_cycle_is_reported_with_its_imports() {
        let tree = files(&[
            ("src/lib.rs", ""),
            ("src/a.rs", "use crate::b::B;"),
            ("src/b.rs", "use crate::c::C;"),
            ("src/c.rs", "fn f() { crate::a::go(); }"),
            ("src/d.rs", "use crate::a::A;"),
        ]);
        let layers: &Layers<'_> = &[("all", &["src/"])];
        assert_eq!(
            check(&tree, layers),
            vec![
                "import cycle between 3 files: src/a.rs, src/b.rs, src/c.rs",
                "  in the cycle: src/a.rs imports crate::b::B from src/b.rs",
                "  in the cycle: src/b.rs imports crate::c::C from src/c.rs",
                "  in the cycle: src/c.rs imports crate::a::go from src/a.rs",
            ]
        );
    }

    #[test]
    fn upward_imports_and_unplaced_files_are_each_reported() {
        let tree = files(&[
            ("src/lib.rs", "pub mod proxy;"),
            (
                "src/balancer.rs",
                "use crate::proxy::pool::IdleConns;\nuse crate::proxy::Chain;",
            ),
            ("src/proxy.rs", "use crate::balancer::Pool;"),
            ("src/proxy/pool.rs", "use super::super::balancer::Pool;"),
            ("src/routes.rs", "use crate::proxy::Chain;"),
        ]);
        let layers: &Layers<'_> = &[
            ("domain", &["src/balancer.rs"]),
            ("data", &["src/proxy.rs", "src/proxy/"]),
            ("root", &["src/lib.rs"]),
        ];
        assert_eq!(
            check(&tree, layers),
            vec![
                "src/routes.rs is in no layer of the table",
                "src/balancer.rs (domain) imports crate::proxy::Chain from src/proxy.rs (data)",
                "src/balancer.rs (domain) imports crate::proxy::pool::IdleConns from src/proxy/pool.rs (data)",
                "import cycle between 3 files: src/balancer.rs, src/proxy.rs, src/proxy/pool.rs",
                "  in the cycle: src/balancer.rs imports crate::proxy::Chain from src/proxy.rs",
                "  in the cycle: src/balancer.rs imports crate::proxy::pool::IdleConns from src/proxy/pool.rs",
                "  in the cycle: src/proxy.rs imports crate::balancer::Pool from src/balancer.rs",
                "  in the cycle: src/proxy/pool.rs imports crate::balancer::Pool (written super::super::balancer::Pool) from src/balancer.rs",
            ]
        );
    }

    #[test]
    fn a_tree_whose_imports_point_down_has_no_problems() {
        let tree = files(&[
            (
                "src/lib.rs",
                "pub mod clock;\npub mod proxy;\npub use proxy::handle;",
            ),
            ("src/clock.rs", "pub fn now() {}"),
            (
                "src/proxy.rs",
                "mod pool;\nuse crate::clock;\npub fn handle() { clock::now(); }",
            ),
            (
                "src/proxy/pool.rs",
                "use crate::clock::now;\n#[cfg(test)]\nmod tests { use super::*; }",
            ),
            ("src/main.rs", "fn main() { meshgate::handle(); }"),
        ]);
        let layers: &Layers<'_> = &[
            ("leaf", &["src/clock.rs"]),
            ("data", &["src/proxy.rs", "src/proxy/"]),
            ("root", &["src/lib.rs", "src/main.rs"]),
        ];
        assert_eq!(check(&tree, layers), Vec::<String>::new());
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let layers: &Layers<'_> = &[
            ("leaf", &["src/discovery.rs", "src/a/b/"]),
            (
                "domain",
                &["src/discovery/consul.rs", "src/discovery/consul/"],
            ),
            ("top", &["src/a/", "src/a/b/special.rs", "src/discovery/"]),
        ];
        assert_eq!(layer_of("src/discovery.rs", layers), Some(0));
        assert_eq!(layer_of("src/discovery/consul.rs", layers), Some(1));
        assert_eq!(layer_of("src/discovery/consul/x/y.rs", layers), Some(1));
        assert_eq!(layer_of("src/discovery/registry.rs", layers), Some(2));
        assert_eq!(layer_of("src/a/b/c.rs", layers), Some(0));
        assert_eq!(layer_of("src/a/b/special.rs", layers), Some(2));
        assert_eq!(layer_of("src/a/z.rs", layers), Some(2));
        assert_eq!(layer_of("src/routes.rs", layers), None);
    }
}
