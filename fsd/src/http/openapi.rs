//! The OpenAPI document, generated from the handlers' annotations (utoipa) and served
//! at `/v1/openapi.json`. `docs/openapi.json` is a checked-in copy; the test
//! `openapi_document_matches_docs` (fsd/tests/http_api.rs) fails when they differ and
//! says how to refresh it.
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::api::files;
use super::Api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "BandSox-FS",
        description = "The REST API of `bandsox serve`: the tree's operations over HTTP, as the same \
                       Unix user, under the same rules (docs/api.md).",
        license(name = "Apache-2.0"),
    ),
    paths(files::get, files::put, files::post, files::delete),
    components(schemas(super::error::ErrorBody)),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "vms", description = "VMs and their ctl lines"),
        (name = "exec", description = "Running commands"),
        (name = "runs", description = "runs/<n>/: output, stdin, signals"),
        (name = "files", description = "The guest's files under fs/"),
        (name = "snapshots"), (name = "images"),
        (name = "events", description = "events, console, usage"),
        (name = "keys", description = "API keys (Unix socket only)"),
    )
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "An API key (bandsox keys add NAME); over the Unix socket no key is needed",
                        ))
                        .build(),
                ),
            );
        }
    }
}

/// The document the routes are added to.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The whole document as pretty JSON (what `/v1/openapi.json` serves).
pub fn json() -> String {
    let (_, doc) = super::api::openapi_router().split_for_parts();
    let mut s = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

pub async fn serve(State(api): State<Arc<Api>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        api.openapi_json().to_string(),
    )
}
