//! The Makefile's targets: every one is documented and listed by `make help`.

#[cfg(test)]
mod tests {
    use std::process::Command;

    use crate::util::root;

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
}
