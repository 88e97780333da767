//! Rendering the Helm chart and reading what it renders; the tests check the
//! chart's promises (least privilege, the wiring between objects, values).

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use serde::Deserialize as _;
use serde_yaml::Value;

use crate::manifests::{CHART, KUBE_VERSION, template};
use crate::util::{output, root};

/// Values that change every default (`helm lint`/`template` run with both).
pub const NON_DEFAULT_VALUES: &str = "charts/packet-capture/ci/non-default-values.yaml";

/// `helm lint --strict` of the chart with `args` added.
pub fn lint(helm: &Path, args: &[&str]) -> anyhow::Result<String> {
    output(
        Command::new(helm)
            .current_dir(root())
            .args(["lint", "--strict", CHART, "--kube-version", KUBE_VERSION])
            .args(args),
    )
}

/// Parses a multi-document YAML stream, rejecting duplicate keys.
pub fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).context("rendered YAML does not parse")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The chart rendered with `args`, as documents.
pub fn render(helm: &Path, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    documents(&template(helm, args)?)
}

/// The document of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}
