//! Replays every committed fuzz input (`fuzz/corpus/<target>/` and the reproducers in
//! `fuzz/regressions/<target>/`) through the same target functions libFuzzer runs, so a
//! plain `cargo test` (no nightly, no cargo-fuzz) keeps every found bug fixed.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn committed_corpus_and_reproducers_pass_every_oracle() {
    let root = fuzz_dir();
    let mut replayed = 0;
    for target in virtio_fuzz_logic::TARGETS {
        let name = target.name;
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "no committed corpus for target {name}");
        for path in corpus
            .iter()
            .chain(&inputs(&root.join("regressions").join(name)))
        {
            let data = std::fs::read(path).expect("readable input");
            if std::panic::catch_unwind(|| (target.run)(&data)).is_err() {
                panic!("fuzz target {name} fails on {}", path.display());
            }
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} fuzz inputs");
}

#[test]
fn empty_and_tiny_inputs_are_valid_for_every_target() {
    for target in virtio_fuzz_logic::TARGETS {
        for data in [&[][..], &[0], &[0xFF; 7], &[1, 2, 3, 4, 5, 6, 7, 8, 9]] {
            (target.run)(data);
        }
    }
}
