//! The bodies of the HTTP API as the OpenAPI document describes them: the wire crate's message types,
//! given to utoipa through stand-ins (their schemas are the wire crate's, converted, so the HTTP
//! documentation cannot drift from the contract), and the few bodies of the HTTP API's own. Handlers and
//! the document both use this module; it uses neither.

use std::borrow::Cow;

use gpu_coordinator_wire::{AckMsg, CancelMsg, ReleaseMsg, RenewMsg, Reply, RequestMsg, StatusDoc};
use schemars::gen::SchemaSettings;
use schemars::JsonSchema;
use serde::Serialize;
use utoipa::openapi::schema::{Object, Schema};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// A wire type's schema, with its definitions as `(name, schema)` components.
pub(super) fn wire<T: JsonSchema>() -> (RefOr<Schema>, Vec<(String, RefOr<Schema>)>) {
    let generator = SchemaSettings::draft07()
        .with(|s| {
            s.definitions_path = "#/components/schemas/".into();
            s.meta_schema = None;
        })
        .into_generator();
    let root = generator.into_root_schema_for::<T>();
    let convert = |name: &str, schema: serde_json::Value| {
        serde_json::from_value::<RefOr<Schema>>(schema).unwrap_or_else(|e| {
            tracing::warn!("the JSON Schema of {name} does not convert to OpenAPI: {e}");
            RefOr::T(Schema::Object(
                Object::builder()
                    .description(Some(format!("see the wire crate's JSON Schema of {name}")))
                    .build(),
            ))
        })
    };
    let name = T::schema_name();
    let main = convert(
        &name,
        serde_json::to_value(&root.schema).unwrap_or_default(),
    );
    let definitions = root
        .definitions
        .into_iter()
        .map(|(name, schema)| {
            let value = serde_json::to_value(&schema).unwrap_or_default();
            let converted = convert(&name, value);
            (name, converted)
        })
        .collect();
    (main, definitions)
}

/// A stand-in that gives a wire type's schema to utoipa under the wire type's name.
macro_rules! wire_schema {
    ($marker:ident, $ty:ty) => {
        pub(super) struct $marker;

        impl utoipa::PartialSchema for $marker {
            fn schema() -> RefOr<Schema> {
                wire::<$ty>().0
            }
        }

        impl utoipa::ToSchema for $marker {
            fn name() -> Cow<'static, str> {
                Cow::Owned(<$ty as JsonSchema>::schema_name())
            }

            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                schemas.extend(wire::<$ty>().1);
            }
        }
    };
}

wire_schema!(RequestSchema, RequestMsg);
wire_schema!(ReleaseSchema, ReleaseMsg);
wire_schema!(RenewSchema, RenewMsg);
wire_schema!(AckSchema, AckMsg);
wire_schema!(CancelSchema, CancelMsg);
wire_schema!(ReplySchema, Reply);
wire_schema!(StatusSchema, StatusDoc);

/// The answer to an input that gets no reply unless it is rejected (an ACK, a release of everything).
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// The request the input is about, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// What happens next.
    pub detail: String,
}

/// The answer of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready`, or `not ready`.
    pub status: String,
    /// Per server (`nats`, `redis`, `postgres`): `ok` or what is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
    /// When not ready: which server is not reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Each server's state for `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    pub nats: String,
    pub redis: String,
    pub postgres: String,
}
