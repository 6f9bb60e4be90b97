//! The documentation keeps up with the code: `docs/flags.md` is what clap says (rewritten with
//! `L4LB_BLESS=1`), the pages name no flag l4lb lacks, every relative link in `README.md` and
//! `docs/` resolves (headings included), and no comment in the code or the scripts, nor any
//! page of the docs, names a file that is not in the tree. Reads files only: no processes, no
//! network.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use clap::{ArgAction, CommandFactory};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const FLAGS_MD: &str = "docs/flags.md";
const BLESS: &str = "L4LB_BLESS=1 cargo test --locked --test it docs::flags_reference";

// ---------------------------------------------------------------------------------------------
// The flags reference

/// One row of the reference: a flag as one or more commands declare it.
struct Row {
    flag: String,
    env: String,
    default: String,
    help: String,
    commands: Vec<String>,
}

/// `docs/flags.md` as clap describes the command line: the commands, then every visible flag
/// once with the commands that take it (a flag whose help or default differs between commands
/// gets a row per variant). Hidden flags and aliases are left out.
fn flags_reference() -> String {
    let cli = l4lb::config::Cli::command();
    let mut out = String::new();
    out.push_str(
        "# Flags\n\n\
         <!-- Generated from the clap definitions in src/config.rs: do not edit by hand. -->\n\
         <!-- Regenerate: ",
    );
    out.push_str(BLESS);
    out.push_str(
        " -->\n\n\
         Every flag also reads the environment variable in its row (a repeatable flag takes \
         comma-separated values there). `l4lb <command> --help` prints the same text. \
         Durations: `500ms`, `30s`, `2m`, `1h30m`. Sizes: bytes, or `K`, `M`, `G` (KiB, MiB, \
         GiB). Exit codes: 0 clean stop, 64 bad configuration, 2 missing privilege, 1 any \
         other failure.\n\n\
         ## Commands\n\n\
         | command | what it does |\n\
         | --- | --- |\n",
    );
    let subs: Vec<_> = cli.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    for s in &subs {
        let about = s.get_about().map(|a| a.to_string()).unwrap_or_default();
        let _ = writeln!(out, "| `l4lb {}` | {} |", s.get_name(), cell(&about));
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut add = |arg: &clap::Arg, command: &str| {
        if arg.is_hide_set() || arg.is_positional() {
            return;
        }
        let Some(long) = arg.get_long() else { return };
        if matches!(long, "help" | "version") {
            return;
        }
        let mut flag = format!("`--{long}");
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_string())
            .collect();
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        if !values.is_empty() && !switch {
            let _ = write!(flag, " {}", values.join("|"));
        }
        flag.push('`');
        if arg.get_value_delimiter().is_some() {
            flag.push_str(" (repeatable)");
        }
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let default = if switch {
            "off".to_string()
        } else {
            let d: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            if d.is_empty() {
                String::new()
            } else {
                format!("`{}`", d.join(","))
            }
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let (flag, help) = (cell(&flag), cell(&help));
        match rows
            .iter_mut()
            .find(|r| r.flag == flag && r.env == env && r.default == default && r.help == help)
        {
            Some(r) => r.commands.push(command.to_string()),
            None => rows.push(Row {
                flag,
                env,
                default,
                help,
                commands: vec![command.to_string()],
            }),
        }
    };
    for arg in cli.get_arguments() {
        add(arg, "all");
    }
    for s in &subs {
        for arg in s.get_arguments() {
            add(arg, s.get_name());
        }
    }
    out.push_str(
        "\n## Flags\n\n\
         | flag | environment | default | commands | meaning |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.flag,
            r.env,
            r.default,
            r.commands.join(", "),
            r.help
        );
    }
    out
}

/// Text made fit for one table cell: one line, pipes escaped, and `<` outside code spans
/// escaped (GitHub would take `<instance>` for an HTML tag and hide it).
fn cell(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(line.len());
    let mut code = false;
    for c in line.chars() {
        match c {
            '`' => {
                code = !code;
                out.push(c);
            }
            '|' => out.push_str("\\|"),
            '<' if !code => out.push_str("&lt;"),
            c => out.push(c),
        }
    }
    out
}

/// The `--flag` names the first column of a reference's rows names.
fn flag_names(reference: &str) -> BTreeSet<String> {
    reference
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .filter_map(|l| {
            let end = l.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))?;
            Some(format!("--{}", &l[..end]))
        })
        .collect()
}

#[test]
fn flags_reference_is_what_clap_says() {
    let path = Path::new(ROOT).join(FLAGS_MD);
    let want = flags_reference();
    if std::env::var_os("L4LB_BLESS").is_some_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have == want {
        return;
    }
    let (in_clap, in_file) = (flag_names(&want), flag_names(&have));
    let missing: Vec<_> = in_clap.difference(&in_file).collect();
    let gone: Vec<_> = in_file.difference(&in_clap).collect();
    panic!(
        "{FLAGS_MD} is not what clap says (missing from it: {missing:?}; named there but gone \
         from clap: {gone:?}; or a help text, default or variable changed).\n\
         Regenerate it with: {BLESS}"
    );
}

/// The renderer sees what a user sees: visible flags with their variables and defaults, and
/// nothing clap hides.
#[test]
fn flags_reference_lists_visible_flags_and_no_hidden_ones() {
    let reference = flags_reference();
    let cli = l4lb::config::Cli::command();
    let mut visible = BTreeSet::new();
    let mut hidden = BTreeSet::new();
    for arg in cli
        .get_arguments()
        .chain(cli.get_subcommands().flat_map(|s| s.get_arguments()))
    {
        if let Some(long) = arg.get_long() {
            if arg.is_hide_set() {
                hidden.insert(format!("--{long}"));
            } else {
                visible.insert(format!("--{long}"));
            }
        }
        for alias in arg.get_all_aliases().into_iter().flatten() {
            hidden.insert(format!("--{alias}"));
        }
    }
    let listed = flag_names(&reference);
    assert_eq!(listed, visible);
    for h in hidden.difference(&visible) {
        assert!(!reference.contains(&format!("`{h}")), "{h} is hidden");
    }
    assert!(
        reference.contains("| `--vip-cidr` | `L4LB_VIP_CIDR` | `11.0.0.0/8` |"),
        "{reference}"
    );
    for command in ["controller", "agent", "run", "check", "vips"] {
        assert!(
            reference.contains(&format!("| `l4lb {command}` |")),
            "{command}"
        );
    }
}

/// Flags of other programs that the docs show (cargo, systemctl, dnsmasq, …).
const FOREIGN_FLAGS: &[&str] = &[
    "--bench",
    "--binary",
    "--bind",
    "--cache-size",
    "--help",
    "--local-ttl",
    "--locked",
    "--nocapture",
    "--now",
    "--open",
    "--release",
    "--signal",
    "--test",
];

/// Every `--flag` the pages name is one of l4lb's (visible or an alias kept for old units) or
/// another program's on [`FOREIGN_FLAGS`]: a renamed or removed flag cannot linger in the prose.
#[test]
fn the_docs_name_only_flags_that_exist() {
    let cli = l4lb::config::Cli::command();
    let mut known: BTreeSet<String> = FOREIGN_FLAGS.iter().map(|f| f.to_string()).collect();
    for arg in cli
        .get_arguments()
        .chain(cli.get_subcommands().flat_map(|s| s.get_arguments()))
    {
        known.extend(arg.get_long().map(|l| format!("--{l}")));
        known.extend(
            arg.get_all_aliases()
                .into_iter()
                .flatten()
                .map(|a| format!("--{a}")),
        );
    }
    let mut unknown = Vec::new();
    for page in markdown_pages() {
        let name = page.strip_prefix(ROOT).unwrap().display().to_string();
        let text = std::fs::read_to_string(&page).unwrap();
        for (i, line) in text.lines().enumerate() {
            for (k, _) in line.match_indices("--") {
                let before = line[..k].chars().next_back();
                let flag: String = line[k + 2..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                    .collect();
                // Not a flag: `a--b`, `---`, a pattern such as `--dns-*`.
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '}'))
                    || !flag.starts_with(|c: char| c.is_ascii_lowercase())
                    || flag.ends_with('-')
                {
                    continue;
                }
                if !known.contains(&format!("--{flag}")) {
                    unknown.push(format!("{name}:{}: --{flag}", i + 1));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "flags l4lb does not have (rename them, or add another program's flag to \
         FOREIGN_FLAGS in tests/it/docs.rs):\n{}",
        unknown.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Links

/// `README.md` and every Markdown page under `docs/`.
fn markdown_pages() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut pages = vec![root.join("README.md")];
    pages.extend(
        tree_files()
            .into_iter()
            .filter(|f| f.starts_with("docs/") && f.ends_with(".md"))
            .map(|f| root.join(f)),
    );
    pages
}

/// Markdown text with fenced blocks and inline code spans blanked out (newlines kept), so
/// what looks like a link or a heading inside code is not taken for one.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let t = line.trim_start();
        match fence {
            Some(f) if t.starts_with(f) => fence = None,
            Some(_) => {}
            None if t.starts_with("```") => fence = Some("```"),
            None if t.starts_with("~~~") => fence = Some("~~~"),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    // Code spans: a run of n backticks up to the next run of exactly n.
    let b = out.as_bytes();
    let mut kept = String::with_capacity(out.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if b[i] != b'`' {
            i += 1;
            continue;
        }
        let run = b[i..].iter().take_while(|&&c| c == b'`').count();
        let mut j = i + run;
        let mut close = None;
        while j < b.len() {
            if b[j] == b'`' {
                let r = b[j..].iter().take_while(|&&c| c == b'`').count();
                if r == run {
                    close = Some(j + r);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                kept.push_str(&out[last..i]);
                kept.extend(
                    out[i..end]
                        .chars()
                        .map(|c| if c == '\n' { '\n' } else { ' ' }),
                );
                last = end;
                i = end;
            }
            None => i += run,
        }
    }
    kept.push_str(&out[last..]);
    kept
}

/// The targets of inline links and images (`[text](target "title")`) and of reference
/// definitions (`[name]: target`).
fn link_targets(prose: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = prose;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after.find(')').unwrap_or(after.len());
        if let Some(t) = after[..end].split_whitespace().next() {
            targets.push(t.trim_matches(|c| c == '<' || c == '>').to_string());
        }
        rest = &after[end..];
    }
    for line in prose.lines() {
        let t = line.trim_start();
        if t.starts_with('[')
            && let Some(close) = t.find("]:")
            && let Some(target) = t[close + 2..].split_whitespace().next()
        {
            targets.push(target.to_string());
        }
    }
    targets
}

/// The anchors GitHub makes of a page's headings: lower case, punctuation other than `-` and
/// `_` dropped, spaces to `-`, and `-1`, `-2`… after repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose_keeping_code_text(text).lines() {
        let hashes = line.bytes().take_while(|&c| c == b'#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let mut title = line[hashes..].trim().to_string();
        // A link in a heading counts by its text.
        while let (Some(open), Some(mid)) = (title.find('['), title.find("](")) {
            let Some(close) = title[mid..].find(')').map(|c| mid + c) else {
                break;
            };
            if open > mid {
                break;
            }
            title = format!(
                "{}{}{}",
                &title[..open],
                &title[open + 1..mid],
                &title[close + 1..]
            );
        }
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// Markdown without fenced blocks but with inline code's text kept (headings' anchors are
/// made from the text a code span shows).
fn prose_keeping_code_text(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(&line.replace('`', ""));
        }
        out.push('\n');
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in markdown_pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(ROOT).unwrap().display().to_string();
        for target in link_targets(&prose(&text)) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let linked = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !linked.exists() {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor
                && linked.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&linked).unwrap()).contains(anchor)
            {
                broken.push(format!("{name}: {target}: no such heading"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(
        checked > 10,
        "only {checked} links found: is the parser right?"
    );
}

#[test]
fn the_link_checker_reads_markdown_as_github_does() {
    let page = "# Title\n## The `cache` of answers\n## Title\n\
                see [a](a.md#x) and `[not](a link)` and ![img](p.png \"t\")\n\
                ```\n[nor](this)\n# not a heading\n```\n[ref]: docs/x.md\n";
    assert_eq!(link_targets(&prose(page)), ["a.md#x", "p.png", "docs/x.md"]);
    assert_eq!(
        anchors(page),
        BTreeSet::from([
            "title".into(),
            "the-cache-of-answers".into(),
            "title-1".into()
        ])
    );
}

// ---------------------------------------------------------------------------------------------
// Comments that name files

/// Names of things outside this tree that comments and docs may cite: kernel headers, other
/// projects' files, and what the scripts write.
const EXTERNAL: &[&str] = &[
    "asm-generic/socket.h",
    "linux/bpf.h",
    "linux/magic.h",
    "bpf_sock.c",
    "bench-results/latest.json",
];

/// Extensions that make a word a file name.
const FILE_EXTENSIONS: &[&str] = &[
    "rs", "md", "sh", "py", "c", "h", "o", "json", "toml", "lock", "yml", "yaml", "html", "png",
    "txt", "service",
];

/// Every file of the tree, relative and `/`-separated, without `target/`, `.git` and what
/// `.gitignore` leaves out of the repository.
fn tree_files() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if matches!(
                name.as_str(),
                "target" | ".git" | "bench-results" | "__pycache__"
            ) {
                continue;
            }
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new(ROOT), Path::new(ROOT), &mut out);
    out.sort();
    out
}

/// The comment text of each line of a source file (`//` in Rust and C, `#` in shell, Python
/// and files without an extension such as `.ci/run`), with its line number; nothing for
/// other files.
fn comments(path: &str, text: &str) -> Vec<(usize, String)> {
    let ext = Path::new(path)
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    let slashes = match ext.as_str() {
        "rs" | "c" | "h" => true,
        "sh" | "py" | "" => false,
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let start = if slashes {
            // `//` not after a `:` (a URL in a string is not a comment).
            line.match_indices("//")
                .map(|(k, _)| k)
                .find(|&k| !line[..k].ends_with(':'))
        } else {
            // `#` at the start of a line or after a blank (not `${x#y}`, not `'#!…'`).
            line.match_indices('#').map(|(k, _)| k).find(|&k| {
                line[..k]
                    .chars()
                    .next_back()
                    .is_none_or(char::is_whitespace)
            })
        };
        if let Some(k) = start {
            out.push((i + 1, line[k..].to_string()));
        }
    }
    out
}

/// The words of `text` that are file names (`foo.rs`, `src/agent/dns/mod.rs`, `l4lb.bpf.c`):
/// neither absolute paths nor URLs nor patterns (`*.bpf.c`, `<link>.table.json`).
fn file_names(text: &str) -> Vec<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-' | '+');
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(is_word) {
        let before = rest[..start].chars().next_back();
        let len = rest[start..]
            .find(|c| !is_word(c))
            .unwrap_or(rest.len() - start);
        let word = rest[start..start + len].trim_end_matches(['.', '-', '/']);
        rest = &rest[start + len..];
        if word.starts_with('/')
            || (word.starts_with('.') && !word.starts_with("./") && !word.starts_with("../"))
            || matches!(before, Some('>' | '}' | '$' | '*' | ':' | '@' | '%'))
            || rest.starts_with(['<', '{', '*', '$'])
        {
            continue;
        }
        let Some((stem, ext)) = word.rsplit_once('.') else {
            continue;
        };
        if FILE_EXTENSIONS.contains(&ext)
            && stem.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        {
            names.push(word.to_string());
        }
    }
    names
}

/// `name`, as cited from `from`, is a file of the tree: a path from the root, a path from the
/// citing file's directory, or the tail of some path (`dns/mod.rs`, `check.sh`).
fn names_a_file(name: &str, from: &str, files: &BTreeSet<String>) -> bool {
    if files.contains(name)
        || EXTERNAL
            .iter()
            .any(|e| name == *e || name.ends_with(&format!("/{e}")))
    {
        return true;
    }
    let mut joined = PathBuf::new();
    for c in Path::new(from)
        .parent()
        .unwrap_or(Path::new(""))
        .join(name)
        .components()
    {
        match c {
            Component::ParentDir => {
                joined.pop();
            }
            Component::CurDir => {}
            c => joined.push(c),
        }
    }
    if files.contains(&*joined.to_string_lossy()) {
        return true;
    }
    let tail = format!("/{}", name.trim_start_matches("./"));
    files.iter().any(|f| f.ends_with(&tail))
}

#[test]
fn comments_and_docs_name_only_files_that_exist() {
    let files: BTreeSet<String> = tree_files().into_iter().collect();
    let mut stale = Vec::new();
    for f in &files {
        let top = f.split('/').next().unwrap_or_default();
        let is_doc = f == "README.md" || (top == "docs" && f.ends_with(".md"));
        let is_code = matches!(top, "src" | "tests" | "benches" | "scripts" | ".ci");
        // This file's own test cases name files that do not exist, on purpose.
        let skip = f.starts_with("tests/fixtures/") || f == "tests/it/docs.rs";
        if !(is_doc || is_code) || skip {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(Path::new(ROOT).join(f)) else {
            continue; // not text (the BPF object)
        };
        let lines: Vec<(usize, String)> = if is_doc {
            text.lines()
                .enumerate()
                .map(|(i, l)| (i + 1, l.to_string()))
                .collect()
        } else {
            comments(f, &text)
        };
        for (line, comment) in lines {
            for name in file_names(&comment) {
                if !names_a_file(&name, f, &files) {
                    stale.push(format!("{f}:{line}: {name}"));
                }
            }
        }
    }
    assert!(
        stale.is_empty(),
        "names of files that are not in the tree (fix the text, or add a name of something \
         outside it to EXTERNAL in tests/it/docs.rs):\n{}",
        stale.join("\n")
    );
}

#[test]
fn file_names_are_found_in_comments_and_patterns_are_not() {
    assert_eq!(
        file_names("// see src/agent/dns/mod.rs and `check.sh`, not DESIGN.md."),
        ["src/agent/dns/mod.rs", "check.sh", "DESIGN.md"]
    );
    assert!(
        file_names("/// `<link>.<netns>.table.json`, *.bpf.c, /usr/include/linux/bpf.h, e.g. 1.5")
            .is_empty()
    );
    assert!(file_names("see https://github.com/cilium/cilium/blob/main/bpf/x.c").is_empty());
    assert_eq!(
        comments(
            "a.sh",
            "echo \"${x#*:}\" # from README.md\nprintf '#!/bin/sh'\n"
        ),
        [(1, "# from README.md".to_string())]
    );
    assert_eq!(
        comments("a.rs", "let u = \"http://x/a.rs\"; // b.rs\n"),
        [(1, "// b.rs".to_string())]
    );
    let files = BTreeSet::from(["src/agent/dns/mod.rs".to_string()]);
    assert!(names_a_file("dns/mod.rs", "src/app.rs", &files));
    assert!(names_a_file("mod.rs", "src/agent/dns/x.rs", &files));
    assert!(names_a_file("../dns/mod.rs", "src/agent/bpf/x.rs", &files));
    assert!(!names_a_file("DESIGN.md", "src/agent/dns/mod.rs", &files));
}
