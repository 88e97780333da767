//! docs/agent-api.yaml against a running agent: every documented route,
//! method and response is produced by a request here, and answers with the
//! documented status, media type and required fields.

use std::collections::BTreeSet;

use packet_capture_test_support::privileged;
use serde_json::Value;

use packet_capture_agent::api::auth::MAX_FAILURES;

use crate::common::apiserver::{APISERVER_AUDIENCE, FakeApiServer, Identity, UNREVIEWABLE};
use crate::common::{Node, Rest};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent-api.yaml");

/// One request: who sends it, what, and the documented response it must get.
struct Case {
    method: &'static str,
    /// The documented path template.
    template: &'static str,
    /// The path as sent.
    path: String,
    token: Option<&'static str>,
    body: Option<String>,
    /// Headers beside the token (`Range`, conditions).
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
}

fn case(
    method: &'static str,
    template: &'static str,
    path: &str,
    token: Option<&'static str>,
    status: u16,
) -> Case {
    Case {
        method,
        template,
        path: path.to_owned(),
        token,
        body: None,
        headers: Vec::new(),
        status,
    }
}

fn with_body(mut c: Case, body: &str) -> Case {
    c.body = Some(body.to_owned());
    c
}

fn with_header(mut c: Case, name: &'static str, value: &'static str) -> Case {
    c.headers.push((name, value));
    c
}

/// Follows a `$ref` within the document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("a local reference");
            resolve(
                doc,
                doc.pointer(pointer).unwrap_or_else(|| panic!("no {r}")),
            )
        }
        None => v,
    }
}

/// Checks `value` against the schema's type, required fields, properties,
/// items and enum; returns the problems found.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("schema type {other} at {at}"),
        None => true,
    };
    if !ok {
        problems.push(format!("{at}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    for field in schema["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        if value.get(field).is_none() {
            problems.push(format!("{at}: required field {field} is missing"));
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        for (name, prop) in props {
            if let Some(v) = value.get(name) {
                check(doc, prop, v, &format!("{at}.{name}"), problems);
            }
        }
    }
    if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
        for (i, v) in values.iter().enumerate() {
            check(doc, items, v, &format!("{at}[{i}]"), problems);
        }
    }
}

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

#[tokio::test]
async fn the_openapi_document_describes_the_agent() {
    if !privileged("the_openapi_document_describes_the_agent") {
        return;
    }
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(DOC).unwrap()).unwrap();
    let node = Node::new();
    let server = FakeApiServer::start(
        &node.left,
        vec![
            Identity {
                token: "writer",
                username: "writer",
                uid: "1",
                groups: &[],
                audience: "packet-capture-agent",
                rules: &[
                    "get packetcaptureconfigs",
                    "list packetcaptureconfigs",
                    "update packetcaptureconfigs",
                    "capture pods",
                    "get packetcaptureconfigs/files",
                ],
            },
            Identity {
                token: "nobody",
                username: "nobody",
                uid: "2",
                groups: &[],
                audience: "packet-capture-agent",
                rules: &[],
            },
            Identity {
                token: "prometheus",
                username: "prometheus",
                uid: "3",
                groups: &[],
                audience: APISERVER_AUDIENCE,
                rules: &["get /metrics"],
            },
            Identity {
                token: "outsider",
                username: "outsider",
                uid: "4",
                groups: &[],
                audience: APISERVER_AUDIENCE,
                rules: &[],
            },
        ],
    );
    let config_dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(config_dir.path());
    let agent = node.agent(&[], &[("KUBECONFIG", kubeconfig.to_str().unwrap())]);
    let rest = Rest::new(&agent).with_token(Some("writer"));
    let w = Some("writer");
    let n = Some("nobody");
    let start = r#"{"id":"doc-1","duration":1,"outputFormat":"text"}"#;
    let captures = "/api/v1/captures";
    let capture = "/api/v1/captures/{id}";
    let targets = "/api/v1/captures/{id}/targets";
    let retarget = r#"{"targetIPs":["10.0.0.1"]}"#;
    let files = "/api/v1/files";
    let file = "/api/v1/files/{name}";
    let packets = "/api/v1/captures/{id}/packets";

    let mut cases = vec![
        case("get", "/health", "/health", None, 200),
        case("get", "/metrics", "/metrics", Some("prometheus"), 200),
        case("get", "/metrics", "/metrics", w, 401),
        case("get", "/metrics", "/metrics", Some("outsider"), 403),
        with_body(case("post", captures, captures, w, 201), start),
        with_body(case("post", captures, captures, w, 200), start),
        with_body(
            case("post", captures, captures, w, 400),
            r#"{"id":"doc-2","duration":-1}"#,
        ),
        with_body(case("post", captures, captures, None, 401), start),
        with_body(case("post", captures, captures, n, 403), start),
        with_body(
            case("post", captures, captures, w, 409),
            r#"{"id":"doc-1","duration":2}"#,
        ),
        with_body(
            case("post", captures, captures, w, 413),
            &format!(r#"{{"id":"doc-3","filter":"{}"}}"#, "x".repeat(1 << 20)),
        ),
        case("get", captures, captures, w, 200),
        case("get", captures, "/api/v1/captures?idPrefix=doc-", w, 200),
        case("get", captures, captures, None, 401),
        case("get", captures, captures, n, 403),
        case("get", capture, "/api/v1/captures/doc-1", w, 200),
        case("get", capture, "/api/v1/captures/doc-1", None, 401),
        case("get", capture, "/api/v1/captures/doc-1", n, 403),
        case("get", capture, "/api/v1/captures/nope", w, 404),
        case("get", packets, "/api/v1/captures/nope/packets", w, 404),
        case("get", packets, "/api/v1/captures/doc-1/packets", None, 401),
        case("get", packets, "/api/v1/captures/doc-1/packets", n, 403),
        case("get", packets, "/api/v1/captures/doc-1/packets", w, 409),
        case(
            "get",
            packets,
            "/api/v1/captures/doc-6/packets?after=-1",
            w,
            400,
        ),
        // Started just before, for two seconds: the stream ends with it.
        case("get", packets, "/api/v1/captures/doc-6/packets", w, 200),
        // A capture that outlasts the test, for new targets.
        with_body(
            case("post", captures, captures, w, 201),
            r#"{"id":"doc-5","duration":600,"targetIPs":["10.0.0.2"]}"#,
        ),
        // Its live readers fill up first.
        case("get", packets, "/api/v1/captures/doc-5/packets", w, 429),
        with_body(
            case("put", targets, "/api/v1/captures/doc-5/targets", w, 200),
            retarget,
        ),
        with_body(
            case("put", targets, "/api/v1/captures/doc-5/targets", w, 400),
            r#"{"targetIPs":["10.0.0.1/33"]}"#,
        ),
        with_body(
            case("put", targets, "/api/v1/captures/doc-5/targets", w, 413),
            &format!(r#"{{"targetIPs":["{}"]}}"#, "x".repeat(1 << 20)),
        ),
        with_body(
            case("put", targets, "/api/v1/captures/doc-5/targets", None, 401),
            retarget,
        ),
        with_body(
            case("put", targets, "/api/v1/captures/doc-5/targets", n, 403),
            retarget,
        ),
        with_body(
            case("put", targets, "/api/v1/captures/nope/targets", w, 404),
            retarget,
        ),
        case("delete", capture, "/api/v1/captures/doc-1", w, 200),
        with_body(
            case("put", targets, "/api/v1/captures/doc-1/targets", w, 409),
            retarget,
        ),
        case("delete", capture, "/api/v1/captures/doc-1", None, 401),
        case("delete", capture, "/api/v1/captures/doc-1", n, 403),
        case("delete", capture, "/api/v1/captures/nope", w, 404),
        case("get", files, files, w, 200),
        case("get", files, files, None, 401),
        case("get", files, files, n, 403),
        // {name} of the 200, 206, 304 and 416 cases is filled in once the
        // capture has a file.
        case("get", file, "", w, 200),
        with_header(case("get", file, "", w, 206), "range", "bytes=4-"),
        with_header(case("get", file, "", w, 416), "range", "bytes=1000000-"),
        with_header(
            case("get", file, "", w, 304),
            "if-modified-since",
            "Sat, 01 Jan 2050 00:00:00 GMT",
        ),
        case("get", file, "/api/v1/files/%2Fetc%2Fpasswd", w, 400),
        case("get", file, "/api/v1/files/x.pcap", None, 401),
        case("get", file, "/api/v1/files/x.pcap", n, 403),
        case("get", file, "/api/v1/files/missing.pcap", w, 404),
    ];
    // Every route that needs a token, with a body where it takes one.
    let guarded = [
        ("post", captures, captures, Some(start)),
        ("get", captures, captures, None),
        ("get", capture, "/api/v1/captures/doc-5", None),
        ("delete", capture, "/api/v1/captures/doc-5", None),
        (
            "put",
            targets,
            "/api/v1/captures/doc-5/targets",
            Some(retarget),
        ),
        ("get", packets, "/api/v1/captures/doc-5/packets", None),
        ("get", files, files, None),
        ("get", file, "/api/v1/files/x.pcap", None),
        ("get", "/metrics", "/metrics", None),
    ];
    let on_every_guarded_route = |token, status| {
        guarded.map(|(method, template, path, body)| {
            let c = case(method, template, path, Some(token), status);
            match body {
                Some(b) => with_body(c, b),
                None => c,
            }
        })
    };
    // The cluster fails the token's review.
    cases.extend(on_every_guarded_route(UNREVIEWABLE, 503));
    // Without its capture directory the node cannot start captures.
    cases.push(with_body(
        case("post", captures, captures, w, 503),
        r#"{"id":"doc-4"}"#,
    ));
    // Last: once this address has had MAX_FAILURES tokens refused, an
    // unknown token is refused unreviewed.
    const REFUSED: &str = "refused-token";
    cases.extend(on_every_guarded_route(REFUSED, 429));

    // The cases cover exactly what the document lists.
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            for status in op["responses"].as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone(), status.parse::<u16>().unwrap()));
            }
        }
    }
    let covered: BTreeSet<_> = cases
        .iter()
        .map(|c| (c.method.to_owned(), c.template.to_owned(), c.status))
        .collect();
    assert_eq!(
        documented, covered,
        "documented responses and test cases differ"
    );

    let mut readers = Vec::new();
    let mut flooded = false;
    for case in &mut cases {
        if case.template == packets && case.status == 429 && case.token == w {
            for _ in 0..8 {
                let reader = rest.get(&case.path).await;
                assert_eq!(reader.status(), 200, "a live reader of {}", case.path);
                readers.push(reader);
            }
        }
        if case.template == file && matches!(case.status, 200 | 206 | 304 | 416) {
            let done = rest.ended("doc-1").await;
            let output = done["output_file"].as_str().unwrap();
            case.path = format!("/api/v1/files/{}", output.rsplit('/').next().unwrap());
        }
        // The writer's own calls: after the flood below its token could
        // be refused unreviewed once its cached verdict expires.
        if case.template == packets && case.token == w {
            rest.ended("doc-1").await;
        }
        if case.template == packets && case.status == 200 {
            let started = rest
                .post(captures, &serde_json::json!({"id": "doc-6", "duration": 2}))
                .await;
            assert_eq!(started.status(), 201);
        }
        if case.status == 503 && case.token == w {
            std::fs::remove_dir_all(node.dir.path()).unwrap();
        }
        // Made-up tokens until the address is refused unreviewed: tokens
        // refused earlier count too, unless their window has passed.
        if case.token == Some(REFUSED) && !flooded {
            for i in 0..=2 * MAX_FAILURES {
                let r = rest
                    .with_token(Some(&format!("made-up-{i}")))
                    .get(captures)
                    .await;
                match r.status().as_u16() {
                    401 => {}
                    429 => {
                        flooded = true;
                        break;
                    }
                    status => panic!("made-up token {i}: {status}"),
                }
            }
            assert!(flooded, "no 429 after {} refused tokens", 2 * MAX_FAILURES);
        }
        let method: reqwest::Method = case.method.to_uppercase().parse().unwrap();
        let mut req = rest.with_token(case.token).request(method, &case.path);
        if let Some(b) = &case.body {
            req = req
                .header("content-type", "application/json")
                .body(b.clone());
        }
        for (name, value) in &case.headers {
            req = req.header(*name, *value);
        }
        let r = req.send().await.unwrap();
        let what = format!("{} {} ({:?})", case.method, case.path, case.token);
        assert_eq!(r.status().as_u16(), case.status, "{what}");
        let op = &doc["paths"][case.template][case.method];
        let response = resolve(&doc, &op["responses"][case.status.to_string()]);
        for header in response["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(h, _)| h)
        {
            assert!(
                r.headers().contains_key(header.as_str()),
                "{what}: no {header} header"
            );
        }
        // A body only where one is documented.
        let Some(content) = response["content"].as_object() else {
            assert!(r.bytes().await.unwrap().is_empty(), "{what}: a body");
            continue;
        };
        let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        let media = media_type(&content_type);
        let documented = content
            .get(media)
            .unwrap_or_else(|| panic!("{what}: {media} is not documented ({:?})", content.keys()));
        let body = r.bytes().await.unwrap();
        if media == "application/json" {
            let value: Value = serde_json::from_slice(&body).unwrap();
            let mut problems = Vec::new();
            check(&doc, &documented["schema"], &value, "body", &mut problems);
            assert!(problems.is_empty(), "{what}: {problems:?}\n{value}");
        }
    }
}
