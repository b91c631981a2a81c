//! `docs/configuration.md` is the one list of the environment variables the binaries read. This
//! test keeps it honest in both directions: every variable the shipped code reads has a row
//! there, and every row names a variable that something still reads (the code, or for the local
//! stack's rows, the Makefile and scripts). It reads source files only: no Kafka, no Postgres.
//!
//! How a read is recognised, kept simple on purpose: in a source file that reads the environment
//! at all (`std::env::var`, the `env_or` / `env_parse` helpers of `chat_common::config`, clap's
//! `env = "..."`, tracing's `EnvFilter::from_default_env`), every string literal spelled like a
//! variable name (`"SHARD_DSNS"`) counts, whether it is passed straight to a reader or through a
//! helper, a closure or a table of names. Literals that set a variable for a child process
//! (`"NAME".into()`, `.env("NAME"`) or name something else (`value_name = "URL"`, `env!(...)`,
//! an HTTP method) do not count. Comment lines and the unit-test module at the end of a file are
//! skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Crates whose `src/` is scanned: the services, the operator and client tools, the benchmark
/// and fault-injection drivers, and the integration-test harness.
const CRATES: &[&str] = &[
    "common",
    "db-writer",
    "multiplexer",
    "gateway",
    "client",
    "ctl",
    "cli",
    "loadgen",
    "chaos",
    "e2e",
];

/// What a file that reads the environment contains.
const READS_ENV: &[&str] = &[
    "env::var",
    "env_or(",
    "env_parse(",
    "env = \"",
    "from_default_env",
];

/// Text just before a literal that means it is not a variable being read.
const NOT_A_READ_BEFORE: &[&str] = &["value_name = ", "env!(", ".env(", "set_var(", "remove_var("];

/// Upper-case literals that are not variables, found in files that read the environment.
const NOT_VARIABLES: &[&str] = &["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"];

/// The page, relative to the workspace root.
const DOC: &str = "docs/configuration.md";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a source file as shipped: without comment lines, and without the unit-test module
/// (`#[cfg(test)]` followed by `mod`, by convention the last item of a file).
fn shipped_code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut code = String::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn is_variable_name(s: &str) -> bool {
    s.len() >= 2
        && !NOT_VARIABLES.contains(&s)
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Every `"NAME"` literal in `code` that reads a variable (see the module docs).
fn variables_read(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if !READS_ENV.iter().any(|r| code.contains(r)) {
        return names;
    }
    if code.contains("from_default_env") {
        // tracing-subscriber's `EnvFilter::from_default_env` reads `RUST_LOG`.
        names.insert("RUST_LOG".to_owned());
    }
    let mut rest = code;
    let mut offset = 0;
    while let Some(open) = rest.find('"') {
        let start = offset + open + 1;
        let tail = &code[start..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        let closed = tail[len..].starts_with('"');
        if closed && is_variable_name(name) {
            let before = code[..start - 1].trim_end();
            let after = &tail[len + 1..];
            let not_a_read = NOT_A_READ_BEFORE
                .iter()
                .any(|b| before.ends_with(b.trim_end()))
                || after.starts_with(".into()");
            if !not_a_read {
                names.insert(name.to_owned());
            }
        }
        // Continue after the closing quote of a name, else just after this quote.
        let next = if closed { start + len + 1 } else { start };
        offset = next;
        rest = &code[next..];
    }
    names
}

/// Variable -> the files (relative to the workspace) whose shipped code reads it.
fn read_by_code(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&root.join(krate).join("src"), &mut files);
        assert!(!files.is_empty(), "no sources found in {krate}/src");
        for file in files {
            let rel = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string();
            for name in variables_read(&shipped_code(&read(&file))) {
                found.entry(name).or_default().insert(rel.clone());
            }
        }
    }
    found
}

/// The variables documented by a row of a table in the page: the backquoted names in its first
/// column (`` `CONN_RATE_PER_SEC` / `CONN_RATE_BURST` `` documents both).
fn documented(doc: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in doc.lines() {
        let Some(row) = line.trim().strip_prefix('|') else {
            continue;
        };
        let first = row.split('|').next().unwrap_or("");
        for (i, part) in first.split('`').enumerate() {
            if i % 2 == 1 && is_variable_name(part) {
                names.insert(part.to_owned());
            }
        }
    }
    names
}

/// The text of the local stack's Makefile and scripts, which read the rows no binary reads.
fn scripts(root: &Path) -> String {
    let mut text = read(&root.join("Makefile"));
    for dir in ["infra/scripts", "bench"] {
        let entries = std::fs::read_dir(root.join(dir)).expect("the scripts' directory");
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "sh") {
                text.push_str(&read(&path));
            }
        }
    }
    text
}

/// Whether `name` occurs in `text` as a whole word.
fn mentions(text: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(name)
        .any(|(i, _)| !text[..i].ends_with(word) && !text[i + name.len()..].starts_with(word))
}

#[test]
fn every_variable_read_is_documented_and_every_documented_one_is_read() {
    let root = workspace();
    let in_code = read_by_code(&root);
    let in_doc = documented(&read(&root.join(DOC)));
    let scripts = scripts(&root);

    assert!(
        in_code.contains_key("SHARD_DSNS") && in_code.contains_key("GATEWAY_ID"),
        "the scan found none of the services' variables; is it looking in the right place? {:?}",
        in_code.keys().collect::<Vec<_>>()
    );

    let undocumented: Vec<String> = in_code
        .iter()
        .filter(|(name, _)| !in_doc.contains(*name))
        .map(|(name, files)| {
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            format!("{name} (read in {})", files.join(", "))
        })
        .collect();
    let unread: Vec<&String> = in_doc
        .iter()
        .filter(|name| !in_code.contains_key(*name) && !mentions(&scripts, name))
        .collect();

    assert!(
        undocumented.is_empty() && unread.is_empty(),
        "{DOC} and the code disagree.\n\
         Read by the code but without a row in {DOC}: {undocumented:#?}\n\
         Documented in {DOC} but read by nothing (neither the code nor the scripts): {unread:#?}"
    );
}

#[test]
fn the_scan_recognises_each_way_of_reading_a_variable() {
    let code = r#"
        let a = env_or("DIRECT_OR", "x");
        let b: u64 = env_parse("DIRECT_PARSE", 1)?;
        let c = std::env::var("STD_VAR");
        #[arg(long, env = "CLAP_ENV", value_name = "URL")]
        let secs = |name: &str| env_parse(name, 1);
        let d = secs("THROUGH_A_CLOSURE");
        for name in ["FROM_A_TABLE"] { std::env::var(name); }
        let filter = EnvFilter::try_from_default_env();
        child.env("SET_FOR_A_CHILD", "1");
        let vars = [("ALSO_SET".into(), "1".into())];
        let dir = env!("CARGO_MANIFEST_DIR");
        let not_a_name = "Mixed_Case";
        rest.request("GET", "/readyz");
        let escaped = "a \"QUOTED\" word";
    "#;
    let names: Vec<String> = variables_read(code).into_iter().collect();
    assert_eq!(
        names,
        [
            "CLAP_ENV",
            "DIRECT_OR",
            "DIRECT_PARSE",
            "FROM_A_TABLE",
            "RUST_LOG",
            "STD_VAR",
            "THROUGH_A_CLOSURE",
        ]
    );
    assert!(variables_read(r#"let m = "NOT_READ";"#).is_empty());
}

#[test]
fn a_row_documents_every_name_in_its_first_column() {
    let doc = "\
| variable | default | meaning |
|---|---|---|
| `ONE` / `TWO` | `THREE` | mentions `FOUR` |
not a row: `FIVE`
";
    let names: Vec<String> = documented(doc).into_iter().collect();
    assert_eq!(names, ["ONE", "TWO"]);
}
