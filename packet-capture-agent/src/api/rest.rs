//! The REST shim: the same calls as gRPC for people and scripts, with the
//! CRD's field names and JSON errors `{"error": "<field>: <problem>"}`.
//! `docs/agent-api.yaml` documents it.

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::auth::Permission;
use super::convert::{CaptureJson, FileJson, Unchecked, UncheckedTargets};
use super::{Api, ApiError, Caller, Conditions, MAX_REQUEST_BYTES, Sent};

pub fn routes() -> Router<Api> {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/captures", get(list_captures).post(start_capture))
        .route(
            "/api/v1/captures/{id}",
            get(get_capture).delete(stop_capture),
        )
        .route("/api/v1/captures/{id}/targets", put(set_targets))
        .route("/api/v1/captures/{id}/packets", get(stream_packets))
        .route("/api/v1/files", get(list_files))
        .route("/api/v1/files/{name}", get(download_file))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found(req: axum::extract::Request) -> Response {
    if super::is_grpc(&req) {
        return tonic::Status::unimplemented(format!("no method {}", req.uri().path()))
            .into_http::<Body>();
    }
    ApiError::NotFound(format!("path: no route {}", req.uri().path())).into_response()
}

async fn method_not_allowed(req: axum::extract::Request) -> Response {
    let mut response = ApiError::Invalid(format!(
        "method: {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
    .into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

#[derive(Serialize)]
struct HealthJson {
    status: &'static str,
    backend: &'static str,
    version: &'static str,
    node: String,
    interfaces: Vec<String>,
}

async fn health(State(api): State<Api>) -> Json<HealthJson> {
    Json(HealthJson {
        status: "ok",
        backend: api.engine.backend(),
        version: env!("CARGO_PKG_VERSION"),
        node: api.engine.node_name().to_owned(),
        interfaces: api.engine.interfaces(),
    })
}

async fn metrics(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
) -> Result<Response, ApiError> {
    api.permit(&caller_of(caller)?, &Permission::metrics())
        .await?;
    Ok((
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        api.metrics.render(),
    )
        .into_response())
}

/// Parses a start request; a problem names the JSON path it is at.
pub fn parse_start(body: &[u8]) -> Result<Unchecked, ApiError> {
    parse_object(body)
}

/// A request body's JSON object, or an error naming the field.
fn parse_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would also take an array of the fields in order.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::Invalid("body: must be a JSON object".into()));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        // "." is the document, "?" a place serde could not name.
        let field = if path == "." || path == "?" {
            "body"
        } else {
            &path
        };
        ApiError::Invalid(format!("{field}: {}", e.inner()))
    })?;
    de.end()
        .map_err(|e| ApiError::Invalid(format!("body: {e}")))?;
    Ok(parsed)
}

async fn start_capture(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let (status, created) = api.start(&caller_of(caller)?, parse_start(&body)?).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(CaptureJson::from(status))).into_response())
}

/// A request body, or an error naming the body.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("body: larger than {MAX_REQUEST_BYTES} bytes"))
        }
        _ => ApiError::Invalid(format!("body: {}", r.body_text())),
    })
}

#[derive(Serialize)]
struct CapturesJson {
    captures: Vec<CaptureJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    /// Only the captures whose id starts with this.
    #[serde(default)]
    id_prefix: String,
}

async fn list_captures(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<CapturesJson>, ApiError> {
    let Query(query) = query.map_err(|r| ApiError::Invalid(format!("query: {}", r.body_text())))?;
    let captures = api.list(&caller_of(caller)?, &query.id_prefix).await?;
    Ok(Json(CapturesJson {
        captures: captures.into_iter().map(Into::into).collect(),
    }))
}

/// The caller the gate put in the request.
fn caller_of(caller: Option<Extension<Caller>>) -> Result<Caller, ApiError> {
    caller
        .map(|Extension(c)| c)
        .ok_or_else(|| ApiError::Unauthenticated("authorization: no caller".into()))
}

/// A path parameter, or a JSON error naming it.
fn param(field: &str, p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|r| ApiError::Invalid(format!("{field}: {}", r.body_text())))
}

async fn get_capture(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CaptureJson>, ApiError> {
    Ok(Json(
        api.get(&caller_of(caller)?, &param("id", id)?)
            .await?
            .into(),
    ))
}

async fn set_targets(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CaptureJson>, ApiError> {
    let targets: UncheckedTargets = parse_object(&body_bytes(body)?)?;
    Ok(Json(
        api.set_targets(&caller_of(caller)?, &param("id", id)?, targets)
            .await?
            .into(),
    ))
}

async fn stop_capture(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CaptureJson>, ApiError> {
    Ok(Json(
        api.stop(&caller_of(caller)?, &param("id", id)?)
            .await?
            .into(),
    ))
}

#[derive(Serialize)]
struct FilesJson {
    files: Vec<FileJson>,
}

async fn list_files(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<FilesJson>, ApiError> {
    let files = api.files(&caller_of(caller)?).await?;
    Ok(Json(FilesJson {
        files: files.into_iter().map(Into::into).collect(),
    }))
}

/// The media type of a capture file, by its extension.
pub fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("pcap") => "application/vnd.tcpdump.pcap",
        Some("pcapng") => "application/x-pcapng",
        Some("txt") => "text/plain; charset=utf-8",
        Some("gz") => "application/gzip",
        Some("zst") => "application/zstd",
        _ => "application/octet-stream",
    }
}

async fn download_file(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    name: Result<Path<String>, PathRejection>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let name = param("name", name)?;
    // A value that is not text names no version of the file.
    let text = |name| request.get(name).map(|v| v.to_str().unwrap_or_default());
    let asked = Conditions {
        range: request.get(header::RANGE).and_then(|v| v.to_str().ok()),
        if_range: text(header::IF_RANGE),
        if_none_match: text(header::IF_NONE_MATCH),
        if_modified_since: text(header::IF_MODIFIED_SINCE),
    };
    let (chunks, sent) = api.download(&caller_of(caller)?, &name, asked).await?;
    if sent.not_modified {
        // The asker's copy is the file (RFC 9110 15.4.5).
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        insert_validators(response.headers_mut(), &sent);
        return Ok(response);
    }
    let mut response = Body::from_stream(chunks).into_response();
    let content_range = sent
        .content_range()
        .and_then(|r| HeaderValue::from_str(&r).ok());
    if content_range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&name)),
    );
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(sent.content_length()),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_validators(headers, &sent);
    if let Some(range) = content_range {
        headers.insert(header::CONTENT_RANGE, range);
    }
    // Valid names are plain ASCII without quotes.
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// The file's `ETag` and `Last-Modified`, with every answer to a download.
fn insert_validators(headers: &mut HeaderMap, sent: &Sent) {
    for (name, value) in sent.validators() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    /// The number (`epb_packetid`) of the last packet a reader got before
    /// its stream broke off.
    after: Option<u64>,
}

/// The packets a running capture records from now on (or after the one
/// `?after=` numbers), as one pcapng stream (`tshark -r -`,
/// `wireshark -k -i -`), written as they come; it ends with the capture.
/// Each packet's number is its `epb_packetid`; packets this reader lost
/// are counted in the next packet's `epb_dropcount`.
async fn stream_packets(
    State(api): State<Api>,
    caller: Option<Extension<Caller>>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    use futures::StreamExt as _;
    use packet_capture_common::crd::OutputFormat;
    use std::collections::HashMap;

    let Query(query) = query.map_err(|r| ApiError::Invalid(format!("query: {}", r.body_text())))?;
    let live = api
        .stream(&caller_of(caller)?, &param("id", id)?, query.after)
        .await?;
    let mut encoder =
        crate::writer::Encoder::new(OutputFormat::Pcapng, live.snaplen).with_origin(live.origin);
    let mut header = Vec::new();
    encoder.file_header(&mut header);
    let mut names = HashMap::<u32, String>::new();
    let packets = api.batches(live.packets).map(move |batch| {
        let mut out = Vec::new();
        encoder.lost(batch.lost);
        for packet in &batch.packets {
            names
                .entry(packet.meta.ifindex)
                .or_insert_with(|| packet.interface.to_string());
            encoder.number(packet.number);
            // pcapng holds any time: nothing is refused.
            let _ = encoder.encode(&mut out, &packet.meta, &packet.data, &names);
        }
        Ok::<_, std::convert::Infallible>(Bytes::from(out))
    });
    let body = futures::stream::once(async { Ok(Bytes::from(header)) }).chain(packets);
    Ok((
        [(header::CONTENT_TYPE, content_type("live.pcapng"))],
        Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(body: &str) -> String {
        parse_start(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn target_errors_name_the_field() {
        let problem = |body: &str| {
            parse_object::<UncheckedTargets>(body.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(problem(r#"{"targetIPs":[1]}"#).starts_with("targetIPs[0]: invalid type"));
        assert_eq!(problem(r#"[["10.0.0.1"]]"#), "body: must be a JSON object");
        assert!(problem(r#"{"targetIPs":[]} x"#).starts_with("body: trailing characters"));
    }

    #[test]
    fn parse_errors_name_the_field() {
        assert!(
            problem(r#"{"id":"a","targetPorts":["x"]}"#)
                .starts_with("targetPorts[0]: invalid type")
        );
        assert!(problem(r#"{"id":"a","duration":1.5}"#).starts_with("duration: invalid type"));
        assert!(
            problem(r#"{"id":"a","outputFormat":"json"}"#)
                .starts_with("outputFormat: unknown variant `json`")
        );
        let unknown = problem(r#"{"id":"a","colour":"red"}"#);
        assert!(unknown.contains("unknown field `colour`"), "{unknown}");
        let eof = problem(r#"{"id":"a""#);
        assert!(eof.starts_with("body: EOF while parsing"), "{eof}");
        assert!(problem(r#"{"id":"a"} x"#).starts_with("body: trailing"));
        assert_eq!(problem("[]"), "body: must be a JSON object");
        assert_eq!(problem(""), "body: must be a JSON object");
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(
            content_type("a-20260101-000000.pcap"),
            "application/vnd.tcpdump.pcap"
        );
        assert_eq!(content_type("a.pcapng"), "application/x-pcapng");
        assert_eq!(content_type("a.txt.gz"), "application/gzip");
        assert_eq!(content_type("a.pcap.zst"), "application/zstd");
        assert!(content_type("a.txt").starts_with("text/plain"));
    }
}
