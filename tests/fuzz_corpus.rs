//! Replays every saved fuzz input (fuzz/corpus/TARGET/ and fuzz/regressions/TARGET/) through
//! the same target bodies that cargo-fuzz runs, so a fixed finding stays fixed on stable Rust.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

/// Runs `target` over every file of the target's corpus and regressions; returns how many.
fn replay(name: &str, target: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for file in files {
            if file
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let data = std::fs::read(&file).unwrap();
            // A panic names the input that caused it.
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "fuzz input {} panicked", file.display());
            n += 1;
        }
    }
    n
}

#[test]
fn config_corpus() {
    assert!(replay("config", targets::config) > 0, "no saved inputs");
}

#[test]
fn consul_corpus() {
    assert!(replay("consul", targets::consul) > 0, "no saved inputs");
}

#[test]
fn request_head_corpus() {
    assert!(
        replay("request_head", targets::request_head) > 0,
        "no saved inputs"
    );
}

#[test]
fn path_corpus() {
    assert!(replay("path", targets::path) > 0, "no saved inputs");
}
