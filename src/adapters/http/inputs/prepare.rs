//! A body checked as a NATS input would be: its service found and authorized, a `request_id` and
//! the service's default priority filled in, and re-encoded as the coordinator reads it.

use axum::http::HeaderMap;
use gpu_coordinator_wire::{decode_input, valid_service_id, Inbound, InputKind};
use serde_json::Value;

use super::super::{operator_acts_for_none, ApiError, HttpState, TokenHolder};

/// A body checked like a NATS input, ready to publish.
pub(super) struct Prepared {
    pub(super) service: String,
    pub(super) kind: InputKind,
    pub(super) payload: Vec<u8>,
    pub(super) input: Inbound,
    /// A request whose `request_id` was made up here: nobody else can know it, so this call creates it.
    pub(super) generated_id: bool,
}

/// Reads the body, finds its service (`service_id`, else the token's), checks the caller may act for
/// it, fills in a `request_id` for a request without one, and validates it as the coordinator will.
pub(super) fn prepare(
    state: &HttpState,
    headers: &HeaderMap,
    body: &[u8],
    kind: InputKind,
) -> Result<Prepared, ApiError> {
    let caller = state.caller(headers)?.cloned();
    let mut value = parse_body(body, kind)?;
    let fields = value
        .as_object_mut()
        .expect("parse_body returns only JSON objects");
    let service = match fields.get("service_id") {
        Some(Value::String(s)) if valid_service_id(s) => s.clone(),
        Some(Value::String(s)) => {
            return Err(ApiError::BadRequest(format!(
                "field `service_id` must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`, got {s:?}"
            )))
        }
        None | Some(Value::Null) => match caller {
            Some(TokenHolder::Service(own)) => own,
            // The token's holder acts for no service: refused as when it names one.
            Some(TokenHolder::Operator) => return Err(operator_acts_for_none()),
            None => {
                return Err(ApiError::BadRequest(
                    "field `service_id` is required: the id of the service this input is for (1 \
                     to 64 characters of A-Z, a-z, 0-9, `_` and `-`)"
                        .into(),
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "field `service_id`: expected a string, got {}",
                describe(other)
            )))
        }
    };
    state.authorize(headers, &service)?;
    // The wire contract requires `priority`; an HTTP body may leave it out for its service's
    // `default_priority`, filled in here so that the stored input carries the priority it is
    // scheduled at (the core checks it against the service's `max_priority` like any other).
    if kind == InputKind::Request && matches!(fields.get("priority"), None | Some(Value::Null)) {
        if let Some(priority) = state
            .inner
            .services
            .get(&service)
            .and_then(|policy| policy.default_priority)
        {
            fields.insert("priority".into(), Value::from(priority));
        }
    }
    let generated_id =
        kind == InputKind::Request && matches!(fields.get("request_id"), None | Some(Value::Null));
    if generated_id {
        fields.insert("request_id".into(), Value::String(new_request_id(&service)));
    }
    let payload = serde_json::to_vec(&value).expect("a JSON value always serializes");
    let subject = state.subjects().input(kind, &service);
    match decode_input(state.subjects(), &subject, None, &payload, 0) {
        Ok(decoded) => Ok(Prepared {
            service,
            kind,
            // What is stored is the typed message encoded again: fields the coordinator does not know
            // are dropped here, so that a caller cannot store arbitrary bytes in the input stream.
            payload: reencode(&decoded.input),
            input: decoded.input,
            generated_id,
        }),
        Err(rejection) => Err(ApiError::BadRequest(rejection.error)),
    }
}

/// The input as the coordinator reads it, in JSON: only its known fields.
fn reencode(input: &Inbound) -> Vec<u8> {
    let encoded = match input {
        Inbound::Request(m) => serde_json::to_vec(m),
        Inbound::Release(m) => serde_json::to_vec(m),
        Inbound::Renew(m) => serde_json::to_vec(m),
        Inbound::Ack(m) => serde_json::to_vec(m),
        Inbound::Cancel(m) => serde_json::to_vec(m),
    };
    encoded.expect("a typed message always serializes")
}

fn parse_body(body: &[u8], kind: InputKind) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(format!(
            "the body is empty: expected a JSON object with the fields of a `{}` input and `service_id`",
            kind.as_str()
        )));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(other) => Err(ApiError::BadRequest(format!(
            "the body must be a JSON object of field names to values, got {}",
            describe(&other)
        ))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// `<svc>-http-<random>`: the handler must know the id to find the reply.
fn new_request_id(service: &str) -> String {
    format!("{service}-http-{:016x}", rand::random::<u64>())
}
