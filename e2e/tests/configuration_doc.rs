//! `docs/configuration.md` is the one list of the environment variables the binaries read. These
//! tests keep it honest in both directions. No Kafka, no Postgres.
//!
//! The services' settings are checked against their declaration itself: the clap command of the
//! gateway and of the multiplexer (`Config::command()`, clap's `CommandFactory`), whose every
//! argument is a flag with a variable and a default. Each variable a service declares has a row
//! in the service's table, or in the shared table with the service in its "read by" column, and
//! the row's default is the declared one; each such row names a variable the service declares.
//!
//! Everything else (the operator and client tools, the harness, logging) is checked by scanning
//! the source: every variable the shipped code reads has a row, and every row names a variable
//! that something still reads (the code, or for the local stack's rows, the Makefile and
//! scripts).
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

use chat_common::config::clap;

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

/// The table of the page that lists the settings shared by the services.
const SHARED: &str = "Shared by the services";

/// A row of a table of the page.
#[derive(Debug)]
struct Row {
    /// The `## ` heading the table is under.
    section: String,
    /// The variables of its first column (`` `CONN_RATE_PER_SEC` / `CONN_RATE_BURST` ``).
    names: Vec<String>,
    /// Its "read by" cell, in a table that has one.
    read_by: Option<String>,
    /// Its "default" cell.
    default: String,
}

/// The rows of every table of the page whose header has a "variable" and a "default" column.
fn rows(doc: &str) -> Vec<Row> {
    let cells = |line: &str| -> Vec<String> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split('|').map(|c| c.trim().to_owned()).collect()
    };
    let mut out = Vec::new();
    let mut section = String::new();
    let mut header: Option<Vec<String>> = None;
    for line in doc.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            section = title.trim().to_owned();
        }
        if !line.trim_start().starts_with('|') {
            header = None;
            continue;
        }
        let row = cells(line);
        let Some(head) = &header else {
            header = Some(row);
            continue;
        };
        if row
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        let column = |name: &str| head.iter().position(|h| h == name).map(|i| row[i].clone());
        let (Some(first), Some(default)) = (row.first(), column("default")) else {
            continue;
        };
        if head.first().map(String::as_str) != Some("variable") {
            continue;
        }
        out.push(Row {
            section: section.clone(),
            names: backquoted(first)
                .into_iter()
                .filter(|n| is_variable_name(n))
                .collect(),
            read_by: column("read by"),
            default,
        });
    }
    out
}

/// The backquoted spans of a cell, in order.
fn backquoted(cell: &str) -> Vec<String> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_owned())
        .collect()
}

/// What a service declares for a variable.
#[derive(Debug)]
struct Declared {
    flag: String,
    default: Option<String>,
    /// A secret's default, kept out of `--help`: the page must not print it either.
    default_hidden: bool,
}

/// Variable -> its declaration, for every argument `--help` shows. Fails on a setting without a
/// variable, or whose flag is not the variable's name (the page states that rule).
fn declared(service: &str, cmd: &clap::Command) -> BTreeMap<String, Declared> {
    let mut out = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || id == "help" || id == "version" {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("{service}: setting {id} has no environment variable"))
            .to_string_lossy()
            .into_owned();
        let flag = format!("--{}", arg.get_long().unwrap_or_default());
        assert_eq!(
            flag,
            chat_common::config::flag_for(&env),
            "{service}: the flag of {env} is not named after it"
        );
        let defaults = arg.get_default_values();
        assert!(defaults.len() <= 1, "{service}: {env} has several defaults");
        out.insert(
            env,
            Declared {
                flag,
                default: defaults.first().map(|d| d.to_string_lossy().into_owned()),
                default_hidden: arg.is_hide_default_value_set(),
            },
        );
    }
    out
}

/// Whether the "read by" cell names `service` as one of its items.
fn read_by(cell: &str, service: &str) -> bool {
    cell.split(',')
        .flat_map(|part| part.split(" and "))
        .any(|item| item.trim() == service)
}

/// What a default cell says for the `index`th variable of its row, as read by `service`: a
/// `(service `value`)` aside wins; then "unset" (no default), "empty" (the empty string), or the
/// row's `index`th backquoted value.
fn documented_default(cell: &str, index: usize, service: &str) -> Option<Option<String>> {
    if let Some(aside) = cell.split(&format!("({service} ")).nth(1) {
        return backquoted(aside).into_iter().next().map(Some);
    }
    if cell.starts_with("unset") {
        return Some(None);
    }
    if cell.starts_with("empty") {
        return Some(Some(String::new()));
    }
    backquoted(cell).into_iter().nth(index).map(Some)
}

/// Whether a documented value stands for `actual`: equal, or abbreviated with `…` (the part
/// before it starts the value, the part after ends it).
fn stands_for(documented: &str, actual: &str) -> bool {
    match documented.split_once('…') {
        Some((head, tail)) => {
            actual.len() >= head.len() + tail.len()
                && actual.starts_with(head)
                && actual.ends_with(tail)
        }
        None => documented == actual,
    }
}

/// The disagreements between a service's declaration and the page.
fn disagreements(service: &str, section: &str, cmd: &clap::Command, rows: &[Row]) -> Vec<String> {
    let declared = declared(service, cmd);
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in rows {
        let for_service = row.section == section
            || (row.section == SHARED
                && row.read_by.as_deref().is_some_and(|c| read_by(c, service)));
        if !for_service {
            continue;
        }
        for (index, name) in row.names.iter().enumerate() {
            documented.insert(name.clone());
            let Some(decl) = declared.get(name) else {
                problems.push(format!(
                    "{name} is documented ({:?} table) as read by the {service}, which does not declare it",
                    row.section
                ));
                continue;
            };
            let doc = documented_default(&row.default, index, service);
            let agrees = if decl.default_hidden {
                // A secret's default: the page describes it without printing it.
                let secret = decl.default.as_deref().unwrap_or_default();
                !row.default.is_empty()
                    && !row.default.starts_with("unset")
                    && (secret.is_empty() || !row.default.contains(secret))
            } else {
                match (&doc, &decl.default) {
                    (Some(Some(d)), Some(actual)) => stands_for(d, actual),
                    (Some(None), None) => true,
                    _ => false,
                }
            };
            if !agrees {
                problems.push(format!(
                    "{name}: the {service} declares the default {:?} ({}), the page says {:?}",
                    decl.default, decl.flag, row.default
                ));
            }
        }
    }
    for (name, decl) in &declared {
        if !documented.contains(name) {
            problems.push(format!(
                "{name} ({}) is declared by the {service} but has no row in the {section:?} table \
                 or the {SHARED:?} table with {service} in its \"read by\" column",
                decl.flag
            ));
        }
    }
    problems
}

#[test]
fn the_services_rows_are_their_declarations_both_ways() {
    let root = workspace();
    let rows = rows(&read(&root.join(DOC)));
    let gateway = gateway::Config::command();
    let multiplexer = multiplexer::Config::command();
    assert!(
        declared("gateway", &gateway).len() > 20
            && declared("multiplexer", &multiplexer).len() > 10,
        "the declarations hold fewer settings than the services have"
    );
    let mut problems = disagreements("gateway", "Gateway", &gateway, &rows);
    problems.extend(disagreements(
        "multiplexer",
        "Multiplexer",
        &multiplexer,
        &rows,
    ));
    assert!(
        problems.is_empty(),
        "{DOC} and the services' declarations disagree:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_declaration_and_a_table_that_disagree_are_caught() {
    #[derive(clap::Parser)]
    #[allow(dead_code)]
    struct Svc {
        /// Documented with its default.
        #[arg(long, env = "SVC_PORT", default_value_t = 80)]
        svc_port: u16,
        /// Documented with another default.
        #[arg(long, env = "SVC_WAIT_MS", default_value_t = 5)]
        svc_wait_ms: u64,
        /// Not documented.
        #[arg(long, env = "SVC_HIDDEN_GEM")]
        svc_hidden_gem: Option<String>,
        /// Documented under "read by".
        #[arg(
            long,
            env = "SHARED_DSNS",
            default_value = "postgres://a/db_0,postgres://a/db_3"
        )]
        shared_dsns: String,
        /// Documented for another service only.
        #[arg(long, env = "OTHER_ONLY", default_value = "")]
        other_only: String,
    }
    let doc = "\
## Shared by the services

| variable | read by | default | meaning |
|---|---|---|---|
| `SHARED_DSNS` | svc, other | `postgres://a/db_0,…_3` | shards |
| `OTHER_ONLY` | other | empty | not for svc |

## Svc

| variable | default | meaning |
|---|---|---|
| `SVC_PORT` | `80` | port |
| `SVC_WAIT_MS` | `7` (other `5`) | wait |
| `SVC_GONE` | unset | removed |
";
    let cmd = <Svc as clap::CommandFactory>::command();
    let mut problems = disagreements("svc", "Svc", &cmd, &rows(doc));
    problems.sort();
    let named: Vec<&str> = problems
        .iter()
        .map(|p| p.split([' ', ':']).next().unwrap_or(""))
        .collect();
    assert_eq!(
        named,
        ["OTHER_ONLY", "SVC_GONE", "SVC_HIDDEN_GEM", "SVC_WAIT_MS"],
        "{problems:#?}"
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
