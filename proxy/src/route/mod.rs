//! Routing: hostname patterns and the table from hostname to the tenant's agent sessions.
pub mod pattern;
pub mod registry;
