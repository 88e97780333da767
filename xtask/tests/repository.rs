//! What is generated or documented stays in step with its source: the CRD
//! with the Rust types, the manifests with the chart, the examples with the
//! README, the Makefile's targets with `make help`.

use std::fs;
use std::process::Command;

use packet_capture_common::crd::OutputFormat;
use xtask::examples::{EXAMPLES, path};
use xtask::manifests::{SAMPLE, by_template, check_example};
use xtask::util::root;

#[test]
fn committed_crd_matches_the_rust_types() {
    xtask::crdgen::run(true).expect("run `cargo xtask crdgen` and commit the result");
}

#[test]
fn committed_manifests_match_the_chart() {
    xtask::manifests::run(true).expect("run `cargo xtask manifests` and commit the result");
}

#[test]
fn documents_are_split_by_their_template() {
    let rendered = "---\n# Source: packet-capture/templates/a.yaml\nkind: A\n---\n\
                    # Source: packet-capture/templates/b/c.yaml\nkind: C\n---\n\
                    # Source: packet-capture/templates/a.yaml\nkind: A2\n";
    let docs = by_template(rendered).unwrap();
    assert_eq!(docs["a.yaml"], ["kind: A", "kind: A2"]);
    assert_eq!(docs["b/c.yaml"], ["kind: C"]);
    assert!(by_template("---\nkind: Orphan\n").is_err());
}

#[test]
fn every_example_is_a_valid_capture_named_like_its_file() {
    for name in EXAMPLES {
        let pcc = check_example(&path(name)).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(pcc.metadata.name.as_deref(), Some(name));
    }
    let sample = check_example(&root().join(SAMPLE)).unwrap();
    assert_eq!(sample.metadata.name.as_deref(), Some("sample-capture"));
}

#[test]
fn examples_show_what_their_names_say() {
    let load = |name| check_example(&path(name)).unwrap().spec;
    assert_eq!(load("ip-capture").filter, "tcp");
    assert!(load("pod-capture").target_ips.is_empty());
    let combined = load("combined-capture");
    assert!(!combined.target_ips.is_empty() && combined.pod_selector.is_some());
    assert_eq!(load("realtime-capture").output_format, OutputFormat::Stdout);
    assert!(load("custom-filter-capture").filter.contains("port 443"));
    let high = load("high-volume-capture");
    assert_eq!(high.target_ips, ["10.0.0.0/24"]);
    assert_eq!(high.duration, 1800);
    let labels = load("label-capture");
    let selector = labels.pod_selector.unwrap();
    assert!(selector.by_labels() && selector.pods.is_empty());
    assert!(labels.node_selector.is_some() && labels.target_ips.is_empty());
}

#[test]
fn examples_directory_holds_exactly_the_examples() {
    let mut found: Vec<String> = fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut want: Vec<String> = EXAMPLES.iter().map(|n| format!("{n}.yaml")).collect();
    want.sort();
    assert_eq!(
        found, want,
        "add new examples to EXAMPLES so they are tested"
    );
}

#[test]
fn readme_shows_each_example_as_it_is_in_examples() {
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    for name in EXAMPLES {
        let text = fs::read_to_string(path(name)).unwrap();
        let body: String = text
            .lines()
            .skip_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            readme.contains(&body),
            "README.md does not show examples/{name}.yaml as it is:\n{body}"
        );
    }
}

/// The targets the README and the seed document.
const DOCUMENTED: [&str; 13] = [
    "help",
    "setup",
    "test",
    "demo",
    "deploy",
    "status",
    "logs-controller",
    "logs-agent",
    "restart",
    "destroy",
    "images",
    "manifests",
    "cross-check",
];

#[test]
fn make_help_lists_every_target_with_a_line() {
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let phony: Vec<&str> = makefile
        .lines()
        .filter_map(|l| l.strip_prefix(".PHONY:"))
        .flat_map(str::split_whitespace)
        .collect();
    for target in DOCUMENTED {
        assert!(
            phony.contains(&target),
            "the Makefile has no target {target}"
        );
    }
    let out = Command::new("make")
        .current_dir(root())
        .args(["--no-print-directory", "help"])
        .output()
        .expect("make");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for target in phony {
        let line = help
            .lines()
            .find(|l| {
                let first = l.split_whitespace().next().unwrap_or_default();
                first.strip_prefix("\x1b[36m").unwrap_or(first) == target
            })
            .unwrap_or_else(|| panic!("`make help` does not list {target}:\n{help}"));
        let words = line.split_whitespace().count();
        assert!(
            words > 2,
            "`make help` gives {target} no description: {line:?}"
        );
    }
}
