//! The agent's API against the real binary: REST with an HTTP client, gRPC
//! with the generated tonic client, authentication through the review APIs,
//! the OpenAPI document, file safety, configuration and shutdown. The
//! privileged tests run the agent in network namespaces with real traffic.

mod auth;
mod capabilities;
mod common;
mod diagnostics;
mod files;
mod grpc;
mod openapi;
mod process;
mod rest;
mod stream;
mod tls;
