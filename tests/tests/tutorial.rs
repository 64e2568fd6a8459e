//! `docs/adding-a-device-type.md` quotes the tree instead of paraphrasing it: every code
//! block is fenced as ```` ```<lang> from=<path> ```` and must appear verbatim in that file
//! (lines that are exactly `// ...` or `# ...` elide code between the parts, which must
//! appear in order). A block without `from=` is only allowed for shell commands (`sh`) and
//! plain text (`text`). So every Rust excerpt is code that compiles, and an excerpt that
//! drifts from the tree fails here.

use std::path::Path;

const TUTORIAL: &str = "docs/adding-a-device-type.md";

struct Block {
    line: usize,
    info: String,
    body: String,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, l) in text.lines().enumerate() {
        match (&mut open, l.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    line: i + 1,
                    info: info.trim().to_string(),
                    body: String::new(),
                })
            }
            (Some(_), Some("")) => out.extend(open.take()),
            (Some(b), _) => {
                b.body.push_str(l);
                b.body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "{TUTORIAL}: unclosed code block");
    out
}

#[test]
fn every_excerpt_is_taken_from_the_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join(TUTORIAL)).expect(TUTORIAL);
    let blocks = blocks(&text);
    assert!(blocks.len() > 10, "{TUTORIAL}: too few code blocks");
    let mut quoted = 0;
    for b in &blocks {
        let mut words = b.info.split_whitespace();
        let lang = words.next().unwrap_or("");
        let from = words.find_map(|w| w.strip_prefix("from="));
        let Some(path) = from else {
            assert!(
                lang == "sh" || lang == "text",
                "{TUTORIAL}:{}: a `{lang}` block must say where it is from (from=<path>)",
                b.line
            );
            continue;
        };
        let source = std::fs::read_to_string(root.join(path))
            .unwrap_or_else(|e| panic!("{TUTORIAL}:{}: {path}: {e}", b.line));
        let mut rest = source.as_str();
        let mut part = String::new();
        let lines = b.body.lines().chain(std::iter::once("// ..."));
        for l in lines {
            if l.trim() == "// ..." || l.trim() == "# ..." {
                if !part.is_empty() {
                    let at = rest.find(&part).unwrap_or_else(|| {
                        panic!(
                            "{TUTORIAL}:{}: this part is not in {path} (in order):\n{part}",
                            b.line
                        )
                    });
                    rest = &rest[at + part.len()..];
                    part.clear();
                }
                continue;
            }
            part.push_str(l);
            part.push('\n');
        }
        quoted += 1;
    }
    assert!(quoted > 10, "{TUTORIAL}: too few excerpts from the tree");
}
