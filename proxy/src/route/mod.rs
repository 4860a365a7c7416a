//! Routing: which tenant and agent serve a TLS stream, decided from its SNI hostname.
pub mod pattern;
