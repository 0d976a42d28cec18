//! The OpenAPI document (`GET /openapi.json`), generated from the handlers' `#[utoipa::path]`s.
//!
//! The message schemas are the wire crate's (schemars), not copies: each is converted into an OpenAPI
//! 3.1 schema (which is JSON Schema) with its definitions as components, so the HTTP documentation
//! cannot drift from the contract.

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::schemas::{Accepted, Checks, Health};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "GPU Coordinator",
        description = "A preemptive priority semaphore for GPUs. The same contract as over NATS \
            (`<prefix>.request.<svc>`, ...): every input goes into the same JetStream input stream, and the answers \
            are the coordinator's replies. Inputs take the NATS fields plus `service_id`. With `[http.tokens]` \
            configured, send `Authorization: Bearer <token>`; a service's token acts only for its own service \
            and reads only its own service's entries of the status and the events; an operator's token (`\"*\"`) \
            reads everything, the metrics included, and acts for no service.",
    ),
    paths(
        super::inputs::request,
        super::inputs::release,
        super::inputs::renew,
        super::inputs::ack,
        super::inputs::cancel,
        super::control::control,
        super::events::events,
        super::ops::status,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::ops::engines,
        openapi_json,
    ),
    components(schemas(ErrorBody, Accepted, Health, Checks)),
    modifiers(&BearerAuth),
    tags(
        (name = "inputs", description = "What services send (and the control orders they receive)"),
        (name = "operators", description = "Status, health, metrics"),
    ),
)]
struct ApiDoc;

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operators",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi_json() -> Response {
    Json(openapi()).into_response()
}

/// The OpenAPI document of the HTTP API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

#[cfg(test)]
mod tests {
    use super::super::schemas::wire;
    use super::*;
    use gpu_coordinator_wire::{
        AckMsg, CancelMsg, ReleaseMsg, RenewMsg, Reply, RequestMsg, StatusDoc,
    };
    use schemars::JsonSchema;

    #[test]
    fn every_wire_schema_converts() {
        fn check<T: JsonSchema>() {
            let (main, defs) = wire::<T>();
            let text = serde_json::to_string(&main).expect("serializes");
            assert!(
                !text.contains("see the wire crate"),
                "{} did not convert: {text}",
                T::schema_name()
            );
            for (name, def) in defs {
                let text = serde_json::to_string(&def).expect("serializes");
                assert!(
                    !text.contains("see the wire crate"),
                    "{name} did not convert: {text}"
                );
            }
        }
        check::<RequestMsg>();
        check::<ReleaseMsg>();
        check::<RenewMsg>();
        check::<AckMsg>();
        check::<CancelMsg>();
        check::<Reply>();
        check::<StatusDoc>();
    }

    #[test]
    fn the_document_has_every_route_and_resolves_its_references() {
        let doc = serde_json::to_value(openapi()).expect("serializes");
        let paths = doc["paths"].as_object().expect("paths");
        for route in [
            "/gpu/request",
            "/gpu/release",
            "/gpu/renew",
            "/gpu/ack",
            "/gpu/cancel",
            "/gpu/status",
            "/gpu/control/{service_id}",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(
                paths.contains_key(route),
                "{route} missing: {:?}",
                paths.keys()
            );
        }
        let schemas = doc["components"]["schemas"]
            .as_object()
            .expect("components");
        let text = doc.to_string();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("#/components/schemas/") {
            rest = &rest[i + "#/components/schemas/".len()..];
            let name: String = rest.chars().take_while(|c| *c != '"').collect();
            assert!(
                schemas.contains_key(&name),
                "unresolved reference {name}; have {:?}",
                schemas.keys()
            );
        }
        assert!(schemas.contains_key("RequestMsg") && schemas.contains_key("StatusDoc"));
        let priority = &schemas["RequestMsg"]["properties"]["priority"];
        assert_eq!(priority["maximum"], 255, "{priority}");
        let pause_ms = &schemas["RequestMsg"]["properties"]["pause_ms"];
        assert_eq!(pause_ms["maximum"], 3_600_000, "{pause_ms}");
        let required = schemas["RequestMsg"]["required"].to_string();
        assert!(!required.contains("pause_ms"), "optional: {required}");
    }
}
