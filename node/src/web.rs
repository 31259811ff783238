//! The HTTP side shared by client and exit: which user-visible errors exist and how an HTTP
//! message maps to its Binary HTTP form.

pub mod api_error;
pub mod http_message;
