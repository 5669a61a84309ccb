//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! code OpenAI uses for the same problem, so clients raise their usual exception types.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_engine::EngineError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }

    /// A 400 about one request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(asked: &str, served: &[&str]) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{asked}` does not exist on this server; it serves {}",
                    served
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::InvalidParam { name, .. } => Self::invalid(name, e.to_string()),
            EngineError::PromptTooLong { .. } => {
                Self::bad_request(e.to_string()).with_code("context_length_exceeded")
            }
            EngineError::EmptyPrompt => Self::bad_request(e.to_string()),
            EngineError::TemplateRender(_) | EngineError::TemplateSyntax(_) => {
                Self::bad_request(e.to_string()).with_code("invalid_messages")
            }
            EngineError::Busy { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("{e}; retry shortly"),
            )
            .with_code("server_busy"),
            EngineError::ShutDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}
