//! The README's example captures, one file each under `examples/`.

use std::path::PathBuf;

use crate::util::root;

/// The examples, by resource name; each is `examples/<name>.yaml`.
pub const EXAMPLES: [&str; 6] = [
    "ip-capture",
    "pod-capture",
    "combined-capture",
    "realtime-capture",
    "custom-filter-capture",
    "high-volume-capture",
];

pub fn path(name: &str) -> PathBuf {
    root().join("examples").join(format!("{name}.yaml"))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use packet_capture_common::crd::OutputFormat;

    use super::*;
    use crate::manifests::{SAMPLE, check_example};

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
}
